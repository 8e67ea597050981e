"""Garbage collection and expiry of hosted content, on `HostedRepositories` itself."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cache.mediatypes import OCI_MANIFEST
from cache.store import DiskContentStore
from proxy.config import Hosted
from proxy.hosted import repository
from proxy.hosted.repository import HostedRepositories
from proxy.units import format_size
from tests.support.proxy import REPO_ROOT


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[HostedRepositories]:
    store = HostedRepositories(Hosted(repositories=("acme/**",), upload_ttl="1h"), tmp_path / "hosted")
    yield store
    store.close()


def upload(hosted: HostedRepositories, repo: str, data: bytes) -> str:
    upload = hosted.start_upload(repo)
    hosted.upload_path(repo, upload).write_bytes(data)
    hosted.complete_upload(repo, upload, sha(data))
    return sha(data)


def manifest_of(layer: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sha(layer), "size": len(layer)}],
        }
    ).encode()


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Move the clock on by `seconds` (from where an earlier call left it)."""
    now = time.time() + seconds
    monkeypatch.setattr(repository.time, "time", lambda: now)


def test_gc_removes_only_blobs_no_manifest_references_once_older_than_upload_ttl(
    hosted: HostedRepositories, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(hosted, "acme/app", b"{}")
    used = upload(hosted, "acme/app", b"used")
    unused = upload(hosted, "acme/app", b"unused")
    hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"used"))
    fresh = hosted.collect()
    assert (fresh.unlinked, fresh.blobs) == (0, 0)  # a blob pushed before its manifest is not collected
    later(monkeypatch, 7200)
    dry = hosted.collect(dry_run=True)
    assert (dry.unlinked, dry.blobs, dry.bytes) == (1, 1, len(b"unused"))
    assert hosted.blob_size("acme/app", unused) is not None  # (not blob_file: a GET would keep it longer)
    done = hosted.collect()
    assert (done.unlinked, done.blobs) == (1, 1)
    assert hosted.blob_file("acme/app", unused) is None
    assert hosted.content.find_blob(unused) is None
    assert hosted.blob_size("acme/app", used) is not None
    manifest = hosted.manifest("acme/app", "v1")
    assert manifest is not None
    hosted.delete_manifest("acme/app", manifest.digest)
    assert hosted.collect().blobs == 2  # its layer and config
    assert hosted.content.find_blob(used) is None


def test_a_blob_another_repository_references_is_kept(
    hosted: HostedRepositories, monkeypatch: pytest.MonkeyPatch
) -> None:
    for repo in ("acme/a", "acme/b"):
        upload(hosted, repo, b"{}")
        upload(hosted, repo, b"shared")
    hosted.put_manifest("acme/b", "v1", OCI_MANIFEST, manifest_of(b"shared"))
    later(monkeypatch, 7200)
    collected = hosted.collect()
    assert (collected.unlinked, collected.blobs) == (2, 0)  # acme/a's links; the bytes stay for acme/b
    assert hosted.blob_file("acme/b", sha(b"shared")) is not None
    assert hosted.blob_file("acme/a", sha(b"shared")) is None


def test_a_stored_blob_nothing_links_is_removed(hosted: HostedRepositories, tmp_path: Path) -> None:
    """What a crash between storing and linking would leave."""
    staged = hosted.uploads_dir / "orphan"
    staged.write_bytes(b"orphan")
    hosted.content.put_blob(sha(b"orphan"), staged, 6)
    assert hosted.collect().blobs == 1
    assert hosted.content.find_blob(sha(b"orphan")) is None


def test_uploads_older_than_upload_ttl_are_dropped(hosted: HostedRepositories, monkeypatch: pytest.MonkeyPatch) -> None:
    started = hosted.start_upload("acme/app")
    hosted.upload_path("acme/app", started).write_bytes(b"partial")
    assert hosted.in_use() >= 7  # uploads in progress count against max_size
    later(monkeypatch, 3599)
    assert hosted.sweep_uploads() == 0
    later(monkeypatch, 2)
    assert hosted.collect(dry_run=True).uploads == 1
    assert hosted.collect().uploads == 1
    with pytest.raises(repository.errors.BlobUploadUnknown):
        hosted.upload_path("acme/app", started)


def gc(config: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "proxy", "gc", *args, "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=True).stdout


def test_gc_command_dry_run_then_real(tmp_path: Path) -> None:
    config = tmp_path / "pullproxy.toml"
    config.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n[hosted]\nrepositories = ["acme/**"]\n')
    store = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "cache" / "hosted")
    staged = store.uploads_dir / "orphan"
    staged.write_bytes(b"orphan")
    store.content.put_blob(sha(b"orphan"), staged, 6)
    store.close()
    assert "would remove 1 blobs" in gc(config, "--dry-run")
    assert "removed 1 blobs" in gc(config)
    assert "removed 0 blobs" in gc(config)


def test_cache_du_shows_hosted_content(tmp_path: Path) -> None:
    config = tmp_path / "pullproxy.toml"
    config.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n[hosted]\nrepositories = ["acme/**"]\nmax_size = "1GiB"\n'
    )
    store = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "cache" / "hosted")
    upload(store, "acme/app", b"x" * 100_000)
    store.close()
    argv = [sys.executable, "-m", "proxy", "cache", "du", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("hosted"))
    assert line.endswith("of 1.0 GiB (pushed, never evicted)"), line
    assert not line.startswith("hosted      0 B"), line


def test_a_blob_found_by_head_or_get_outlives_gc_until_its_manifest_arrives(
    hosted: HostedRepositories, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: a client finds an old unreferenced blob, gc runs, then the client's manifest PUT."""
    upload(hosted, "acme/app", b"{}")
    upload(hosted, "acme/app", b"old layer")
    later(monkeypatch, 7200)  # both links are older than upload_ttl, and no manifest names them
    assert hosted.blob_file("acme/app", sha(b"{}")) is not None  # what HEAD and GET ask
    assert hosted.blob_file("acme/app", sha(b"old layer")) is not None
    later(monkeypatch, 3590)  # gc runs just before upload_ttl has passed since the HEAD
    assert hosted.collect().blobs == 0
    hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"old layer"))
    assert hosted.blob_file("acme/app", sha(b"old layer")) is not None


def test_a_blob_nobody_asked_for_is_still_collected_after_upload_ttl(
    hosted: HostedRepositories, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(hosted, "acme/app", b"old layer")
    later(monkeypatch, 7200)
    assert hosted.blob_file("acme/app", sha(b"old layer")) is not None
    later(monkeypatch, 3600 + repository.NEEDED_SLACK + 1)
    assert hosted.collect().blobs == 1
    with pytest.raises(repository.errors.ManifestBlobUnknown):
        hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"old layer"))


def test_a_mount_or_an_upload_of_an_old_blob_keeps_it_for_upload_ttl(
    hosted: HostedRepositories, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(hosted, "acme/base", b"{}")
    upload(hosted, "acme/base", b"base layer")
    later(monkeypatch, 7200)
    assert hosted.mount("acme/app", "acme/base", sha(b"base layer")) == len(b"base layer")
    upload(hosted, "acme/app", b"{}")  # lands on the stored blob
    later(monkeypatch, 3590)
    hosted.collect()
    hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"base layer"))


def test_cache_ls_lists_hosted_tags_marked_hosted(tmp_path: Path) -> None:
    config = tmp_path / "pullproxy.toml"
    config.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n[hosted]\nrepositories = ["acme/**"]\n')
    store = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "cache" / "hosted")
    upload(store, "acme/app", b"{}")
    upload(store, "acme/app", b"x" * 5000)
    pushed = store.put_manifest("acme/app", "1", OCI_MANIFEST, manifest_of(b"x" * 5000))
    store.close()
    argv = [sys.executable, "-m", "proxy", "cache", "ls", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("acme/app:1 "))
    assert pushed.digest[:19] in line
    assert format_size(5000 + 2 + len(manifest_of(b"x" * 5000))) in line, line  # layer, config, manifest
    assert line.endswith("hosted"), line


class Interleaved(DiskContentStore):
    """A hosted store that runs `during_put` after storing a blob, before the upload links it."""

    during_put: Callable[[], None] = staticmethod(lambda: None)

    def put_blob(self, digest: str, staged: Path, size: int | None = None) -> None:
        super().put_blob(digest, staged, size)
        self.during_put()


def test_gc_between_storing_an_uploaded_blob_and_linking_it_keeps_the_blob(tmp_path: Path) -> None:
    content = Interleaved(tmp_path / "hosted", 1 << 40)
    hosted = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "hosted", content=content)
    collected: list[repository.Collected] = []
    content.during_put = lambda: collected.append(hosted.collect())
    try:
        digest = upload(hosted, "acme/app", b"stored, not linked yet")
        assert collected[0].blobs == 0
        assert hosted.blob_file("acme/app", digest) is not None
        assert hosted.index.held_digests() == set()  # the hold went with the upload
    finally:
        hosted.close()


def test_storing_an_uploaded_blob_does_not_hold_the_write_lock(tmp_path: Path) -> None:
    """Another writer (gc, another push) is not kept waiting while an object store upload runs."""
    content = Interleaved(tmp_path / "hosted", 1 << 40)
    hosted = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "hosted", content=content)
    other = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "hosted")  # another process's index
    wrote: list[str] = []
    during_put: list[list[str]] = []

    def another_writer() -> None:
        with other.index.write():
            wrote.append("other")

    def meanwhile() -> None:
        thread = threading.Thread(target=another_writer)
        thread.start()
        thread.join(5)
        during_put.append(list(wrote))

    content.during_put = meanwhile
    try:
        upload(hosted, "acme/app", b"a big layer")
        assert during_put == [["other"]]
    finally:
        other.close()
        hosted.close()


class Elsewhere:
    """A content store that is not on this disk (as a bucket is): every call goes to a disk store inside."""

    def __init__(self, directory: Path) -> None:
        self._inner = DiskContentStore(directory, 1 << 40)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_a_pushed_blob_is_not_looked_up_in_the_cache_when_hosted_content_is_not_on_this_disk(tmp_path: Path) -> None:
    """A hard link saves space only on one disk; asking a bucket-backed cache could fetch the object."""
    asked: list[str] = []

    def cached(digest: str) -> None:
        asked.append(digest)

    content: Any = Elsewhere(tmp_path / "hosted")
    hosted = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "hosted", cached, content=content)
    try:
        digest = upload(hosted, "acme/app", b"layer")
        assert hosted.blob_file("acme/app", digest) is not None
        assert asked == []
    finally:
        hosted.close()
    on_disk = HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "disk", cached)
    try:
        upload(on_disk, "acme/app", b"layer")
        assert asked == [sha(b"layer")]  # on one disk the cache is asked, to store the bytes once
    finally:
        on_disk.close()
