"""Downloads keep the cache honest: only complete, flushed, verified bytes are stored, in-flight bytes
count against max_size, and nothing a request creates in the partial area outlives its download."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cache import digests
from cache.store import ContentStore

MIB = 1 << 20


def test_put_blob_refuses_a_file_of_another_size_than_was_verified(tmp_path: Path) -> None:
    store = ContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(MIB)
    staged = store.partial_dir / "staged"
    staged.write_bytes(data[: MIB // 2])  # the second half never reached the disk
    with pytest.raises(Exception, match="verified"):
        store.put_blob(digests.of(data), staged, size=len(data))
    assert not store.has_blob(digests.of(data))
    store.close()


# -- 2. flushed before it becomes visible ------------------------------------------------------


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every fsync (of which inode) and rename (of which inode) in order."""
    events: list[tuple[str, int]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_rename(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        events.append(("rename", os.stat(source).st_ino))
        rename(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    return events


def test_a_blob_is_flushed_before_it_is_renamed_into_the_store_and_its_directory_after(
    tmp_path: Path, flushes: list[tuple[str, int]]
) -> None:
    store = ContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(MIB)
    staged = store.partial_dir / "staged"
    staged.write_bytes(data)
    blob = staged.stat().st_ino
    store.put_blob(digests.of(data), staged)
    found = store.find_blob(digests.of(data))
    assert found is not None and Path(found[0]).read_bytes() == data
    renamed = flushes.index(("rename", blob))
    assert ("fsync", blob) in flushes[:renamed], "the data must be on the disk before its name is"
    assert ("fsync", os.stat(os.path.dirname(found[0])).st_ino) in flushes[renamed:], "and the new name with it"
    store.close()


def test_a_manifest_large_enough_for_a_file_of_its_own_is_flushed(
    tmp_path: Path, flushes: list[tuple[str, int]]
) -> None:
    from cache.store import Manifest

    store = ContentStore(tmp_path, max_size=64 * MIB)
    body = json.dumps({"schemaVersion": 2, "padding": "x" * (64 << 10)}).encode()
    store.put_manifest(Manifest(digests.of(body), "application/vnd.oci.image.manifest.v1+json", body))
    (file,) = (tmp_path / "content").rglob("*.val")
    assert ("fsync", file.stat().st_ino) in flushes
    assert ("fsync", file.parent.stat().st_ino) in flushes
    store.close()
