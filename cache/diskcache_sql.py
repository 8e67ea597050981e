"""The one adapter to diskcache: its `Cache` behind typed methods, and the SQL it has no public call for.

diskcache has no type stubs and no public "least recently used key", "recorded size" or
"change an entry's tag", so the content store's eviction, pins and integrity check query
its SQLite table `Cache` directly (columns `key`, `raw`, `tag`, `size`, `value`,
`access_time`). Those queries, diskcache's `Disk` subclass and every `Any` stay here; the
version range is pinned in pyproject.toml, the schema is checked when a cache is opened, and
tests/unit/test_diskcache_sql.py runs each query against the installed diskcache, so an
upgrade that changes any of it fails loudly instead of evicting the wrong entries.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

import diskcache  # type: ignore[import-untyped]
from diskcache.core import MODE_BINARY, UNKNOWN  # type: ignore[import-untyped]

SUPPORTED = ">=5.6,<5.7"  # the range in pyproject.toml, checked by the adapter's test
VERSION: str = diskcache.__version__
PINNED = "pinned"  # the `tag` of pinned entries, in the SQLite file every process shares
COLUMNS = frozenset({"key", "raw", "tag", "size", "value", "access_time"})  # the ones queried here

Key = str | tuple[str, ...]  # a str is stored raw (the SQL below finds it); a tuple is pickled


class EvictionPolicy(enum.StrEnum):
    LEAST_RECENTLY_USED = "least-recently-used"
    LEAST_RECENTLY_STORED = "least-recently-stored"
    NONE = "none"


class SchemaMismatch(RuntimeError):
    """The installed diskcache's table is not the one the queries here were written for."""


class Row(NamedTuple):
    """One raw-keyed entry as the SQL sees it."""

    key: str
    size: int  # bytes of its file, or of its value when that lives inside SQLite
    access_time: float  # wall clock
    pinned: bool


class SqlCache:
    """One diskcache `Cache` directory, typed.

    With `renaming`, `move_in` stores a file by renaming it to the cache's own file name
    (never copied), and every file diskcache writes is flushed with its directory.
    """

    def __init__(
        self,
        directory: Path,
        eviction_policy: EvictionPolicy,
        size_limit: int | None = None,
        cull_limit: int | None = None,
        renaming: bool = False,
    ) -> None:
        settings: dict[str, Any] = {"eviction_policy": eviction_policy.value}
        if size_limit is not None:
            settings["size_limit"] = size_limit
        if cull_limit is not None:
            settings["cull_limit"] = cull_limit
        if renaming:
            settings["disk"] = _RenamingDisk
        self._cache: Any = diskcache.Cache(str(directory), **settings)
        try:
            missing = COLUMNS - set(self.columns())
            if missing:
                raise SchemaMismatch(
                    f"diskcache {VERSION} at {directory} has no column {', '.join(sorted(missing))} in its"
                    f" Cache table; pullproxy supports diskcache{SUPPORTED}"
                )
        except BaseException:
            self._cache.close()
            raise

    @property
    def size_limit(self) -> int:
        return int(self._cache.size_limit)

    # -- diskcache's public API, typed -------------------------------------------------

    def get(self, key: Key, default: object = None) -> object:
        return cast(object, self._cache.get(key, default))

    def open_file(self, key: str) -> BinaryIO | None:
        """The open file of a value stored in a file of its own (`move_in`); refreshes its last use."""
        return cast(BinaryIO | None, self._cache.get(key, read=True))

    def set(self, key: Key, value: object) -> None:
        self._cache.set(key, value)

    def move_in(self, key: str, staged: Path, size: int) -> None:
        """Store the flushed file `staged` (of `size` bytes) as `key`'s value by renaming it; needs `renaming`."""
        self._cache.set(key, StagedFile(staged, size))

    def delete(self, key: Key) -> bool:
        return bool(self._cache.delete(key))

    def __contains__(self, key: Key) -> bool:
        return bool(key in self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def volume(self) -> int:
        """Bytes stored: files, plus SQLite's own pages."""
        return int(self._cache.volume())

    @contextlib.contextmanager
    def transact(self) -> Iterator[None]:
        """What runs inside is one SQLite transaction; no other process writes meanwhile. Nests."""
        with self._cache.transact():
            yield

    def touch(self, keys: Iterable[str]) -> None:
        """Refresh the last use of these entries, in one transaction."""
        with self._cache.transact():
            for key in keys:
                # A read refreshes access_time under the LRU policy; the value is not needed.
                handle = self._cache.get(key, read=True)
                if hasattr(handle, "close"):
                    handle.close()

    def close(self) -> None:
        self._cache.close()

    # -- the SQL diskcache has no public call for (raw keys only) -------------------------

    def columns(self) -> list[str]:
        return [str(row[1]) for row in self._cache._sql("PRAGMA table_info(Cache)").fetchall()]

    def recorded_size(self, key: str) -> int | None:
        """The size diskcache recorded when it stored `key` (0 for a value inside SQLite)."""
        row = self._cache._sql("SELECT size FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
        return None if row is None else int(row[0])

    def set_pinned(self, key: str, pinned: bool) -> None:
        """Pin (or unpin) an entry, if it is stored; eviction by `least_recently_used` skips pinned ones."""
        self._cache._sql("UPDATE Cache SET tag = ? WHERE key = ? AND raw = 1", (PINNED if pinned else None, key))

    def pinned_keys(self) -> list[str]:
        return [str(key) for (key,) in self._cache._sql("SELECT key FROM Cache WHERE tag = ?", (PINNED,)).fetchall()]

    def rows(self) -> list[Row]:
        """Every raw-keyed entry. Values inside SQLite (small ones) are recorded with size 0: counted by length."""
        rows = self._cache._sql(
            "SELECT key, size + IFNULL(length(value), 0), access_time, tag FROM Cache WHERE raw = 1"
        ).fetchall()
        return [Row(str(key), int(size), float(access_time), tag == PINNED) for key, size, access_time, tag in rows]

    def unpinned_volume(self) -> int:
        """Bytes of files that eviction may remove."""
        row = self._cache._sql(
            "SELECT IFNULL(SUM(size), 0) FROM Cache WHERE tag IS NOT ? AND raw = 1", (PINNED,)
        ).fetchone()
        return int(row[0])

    def least_recently_used(self) -> str | None:
        """The unpinned entry used longest ago, None if there is none."""
        row = self._cache._sql(
            "SELECT key FROM Cache WHERE tag IS NOT ? ORDER BY access_time LIMIT 1", (PINNED,)
        ).fetchone()
        return None if row is None else cast(str, row[0])


class StagedFile:
    """A verified, flushed file on the cache's own filesystem, to be moved (not copied) into it."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size


class _RenamingDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache is untyped
    """Stores a `StagedFile` by renaming it to the cache's file name; every file it writes is flushed."""

    def store(self, value: object, read: bool, key: object = UNKNOWN) -> tuple[int, int, str | None, object]:
        if isinstance(value, StagedFile):
            filename, full_path = self.filename(key, value)
            directory = os.path.dirname(full_path)
            for attempt in range(10):
                created = _make_directories(directory)
                try:
                    os.rename(value.path, full_path)
                    break
                except FileNotFoundError:
                    # Another process's eviction may remove a directory it emptied.
                    if attempt == 9 or not value.path.exists():
                        raise
            _sync_directories(directory, created)
            return value.size, MODE_BINARY, filename, None
        stored = cast(tuple[int, int, str | None, object], super().store(value, read, key))
        if stored[2] is not None:  # a large value (a big manifest) went into a file of its own
            full_path = os.path.join(self._directory, stored[2])
            _sync_file(full_path)
            _sync_directories(os.path.dirname(full_path), [])
        return stored


def _make_directories(directory: str) -> list[str]:
    """`os.makedirs`, returning the directories it created (whose parents must be flushed too)."""
    created = []
    path = directory
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    return created


def _sync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directories(directory: str, created: list[str]) -> None:
    """Flush the entry of a new file in `directory`, and those of the directories just created."""
    for path in [directory, *(os.path.dirname(new) for new in created)]:
        with contextlib.suppress(FileNotFoundError):
            _sync_file(path)
