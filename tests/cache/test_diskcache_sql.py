"""cache.diskcache_sql: its queries of diskcache's private SQLite schema hold for the installed diskcache.

An upgrade of diskcache that renames a column, stops recording sizes or last uses, or keeps
tags elsewhere must fail here, not evict the wrong entries or lose pins in production.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import time
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cache import diskcache_sql
from cache.diskcache_sql import PINNED, EvictionPolicy, SchemaMismatch, SqlCache
from cache.meta import DiskMetadata
from cache.storage import TagRecord

ROOT = Path(__file__).parent.parent.parent


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[SqlCache]:
    opened = SqlCache(tmp_path / "content", EvictionPolicy.LEAST_RECENTLY_USED, cull_limit=0, renaming=True)
    yield opened
    opened.close()


def staged(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def test_the_installed_diskcache_is_in_the_range_pinned_in_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in declared if Requirement(d).name == "diskcache"]
    assert requirement.specifier == SpecifierSet(diskcache_sql.SUPPORTED)
    assert requirement.specifier.contains(metadata.version("diskcache"))
    assert metadata.version("diskcache") == diskcache_sql.VERSION


def test_the_cache_table_has_every_column_the_queries_use(cache: SqlCache) -> None:
    assert set(cache.columns()) >= {"key", "raw", "tag", "size", "value", "access_time"}


def test_a_cache_table_without_a_queried_column_stops_the_opening(tmp_path: Path) -> None:
    (tmp_path / "content").mkdir()
    with sqlite3.connect(tmp_path / "content" / "cache.db") as db:  # as a diskcache without `tag` would make it
        db.execute(
            "CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL,"
            " expire_time REAL, access_time REAL, access_count INTEGER DEFAULT 0, size INTEGER DEFAULT 0,"
            " mode INTEGER DEFAULT 0, filename TEXT, value BLOB)"
        )
    with pytest.raises(SchemaMismatch, match="no column tag"):
        SqlCache(tmp_path / "content", EvictionPolicy.LEAST_RECENTLY_USED)


def test_least_recently_used_follows_the_last_uses_diskcache_records(tmp_path: Path, cache: SqlCache) -> None:
    for name in "abc":
        cache.move_in(name, staged(tmp_path / "partial", name, name.encode() * 10), 10)
        time.sleep(0.002)  # distinct access times
    assert cache.least_recently_used() == "a"
    cache.touch(["a"])
    assert cache.least_recently_used() == "b"
    handle = cache.open_file("b")  # diskcache's own read refreshes the use too
    assert handle is not None
    handle.close()
    assert cache.least_recently_used() == "c"
    assert [row.key for row in sorted(cache.rows(), key=lambda row: row.access_time)] == ["c", "a", "b"]


def test_a_pinned_entry_carries_diskcaches_tag_and_is_never_least_recently_used(
    tmp_path: Path, cache: SqlCache
) -> None:
    for name in "ab":
        cache.move_in(name, staged(tmp_path / "partial", name, b"x" * 100), 100)
        time.sleep(0.002)
    cache.set_pinned("a", True)
    cache.set_pinned("unknown", True)  # not stored: nothing happens
    assert cache._cache.get("a", tag=True)[1] == PINNED  # the column written is the one diskcache calls tag
    assert cache.pinned_keys() == ["a"]
    assert cache.least_recently_used() == "b"
    assert {row.key: row.pinned for row in cache.rows()} == {"a": True, "b": False}
    assert cache.unpinned_volume() == 100
    cache.delete("b")
    assert cache.least_recently_used() is None  # only the pinned one is left
    cache.set_pinned("a", False)
    assert cache.pinned_keys() == [] and cache._cache.get("a", tag=True)[1] is None
    assert cache.least_recently_used() == "a" and cache.unpinned_volume() == 100


def test_sizes_are_those_recorded_for_files_and_the_lengths_of_values_inside_sqlite(
    tmp_path: Path, cache: SqlCache
) -> None:
    cache.move_in("blob", staged(tmp_path / "partial", "blob", b"x" * 1000), 1000)
    cache.set("manifest:small", ("application/json", b"{}"))
    assert cache.recorded_size("blob") == 1000
    assert cache.recorded_size("manifest:small") == 0  # diskcache records 0 for a value inside SQLite
    assert cache.recorded_size("missing") is None
    sizes = {row.key: row.size for row in cache.rows()}
    assert sizes["blob"] == 1000
    assert sizes["manifest:small"] == len(pickle.dumps(("application/json", b"{}"), protocol=pickle.HIGHEST_PROTOCOL))
    assert cache.volume() >= 1000 and len(cache) == 2


def test_a_staged_file_is_renamed_into_the_cache_not_copied(tmp_path: Path, cache: SqlCache) -> None:
    path = staged(tmp_path / "partial", "staged", b"layer bytes")
    inode = os.stat(path).st_ino
    cache.move_in("sha256:layer", path, len(b"layer bytes"))
    assert not path.exists()
    handle = cache.open_file("sha256:layer")
    assert handle is not None
    with handle:
        assert os.fstat(handle.fileno()).st_ino == inode and handle.read() == b"layer bytes"
    assert cache.open_file("sha256:missing") is None


def test_tag_records_are_pickled_as_every_version_wrote_them(tmp_path: Path) -> None:
    """Bytes written by the code before the storage interface: a cache stays readable both ways."""
    before = (
        b"\x80\x05\x95w\x00\x00\x00\x00\x00\x00\x00\x8c\ncache.meta\x94\x8c\tTagRecord\x94\x93\x94)\x81\x94]\x94("
        b"\x8cGsha256:" + b"a" * 64 + b"\x94GA\xd9T\xfc@ \x00\x00eb."
    )
    record = TagRecord("sha256:" + "a" * 64, 1700000000.5)
    assert pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) == before
    assert pickle.loads(before) == record
    meta = DiskMetadata(tmp_path)
    try:
        meta.set_tag("up", "team/app", "1", record.digest)
    finally:
        meta.close()
    with sqlite3.connect(tmp_path / "meta" / "cache.db") as db:
        (stored,) = [value for (value,) in db.execute("SELECT value FROM Cache") if b"TagRecord" in value]
    assert b"\x8c\ncache.meta\x94\x8c\tTagRecord" in stored


def test_only_the_adapter_imports_diskcache() -> None:
    importing = sorted(
        str(path.relative_to(ROOT))
        for package in ("cache", "proxy")
        for path in (ROOT / package).rglob("*.py")
        if any(line.startswith(("import diskcache", "from diskcache")) for line in path.read_text().splitlines())
    )
    assert importing == ["cache/diskcache_sql.py"]
