"""Blobs and manifests by digest in a size-bounded, least-recently-used diskcache.

A blob enters the cache only by renaming a fully verified file into place, so a crash
never leaves a partial blob visible and a large layer is never copied a second time.
The file is flushed to the disk before the rename and its directory after it, both
before the SQLite row that makes it visible: after a power loss an entry either names
complete bytes or is gone.
Hits are served from an in-memory map of digest to file path; their LRU bookkeeping is
queued and written to SQLite in one transaction every few seconds instead of once per hit.
Pinned entries carry diskcache's `tag` "pinned" in the shared SQLite file, so every
process's eviction skips them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import diskcache
from cachetools import LRUCache
from diskcache.core import MODE_BINARY, UNKNOWN

_MANIFEST = "manifest:"
PINNED = "pinned"


class IncompleteFile(Exception):
    """A staged file does not hold the bytes that were verified: it is not stored."""


class StagedFile:
    """A verified, flushed file on the cache's own filesystem, to be moved (not copied) into it."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size


class _RenamingDisk(diskcache.Disk):
    """Stores a `StagedFile` by renaming it to the cache's file name; every file it writes is flushed."""

    def store(self, value: object, read: bool, key: object = UNKNOWN) -> tuple:
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
        stored = super().store(value, read, key)
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


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached blob or manifest, for the cache tools."""

    digest: str
    is_manifest: bool
    size: int
    last_used: float  # wall clock
    pinned: bool


def manifest_key(digest: str) -> str:
    return _MANIFEST + digest


class ContentStore:
    """Content-addressed storage shared by every upstream: a digest names the same bytes anywhere."""

    def __init__(self, directory: Path, max_size: int) -> None:
        self.directory = directory
        self.max_size = max_size
        self.partial_dir = directory / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(
            str(directory / "content"),
            size_limit=max_size,
            eviction_policy="least-recently-used",
            cull_limit=0,  # culled explicitly after each insert, down to the limit
            disk=_RenamingDisk,
        )
        self._paths: LRUCache[str, tuple[str, int]] = LRUCache(maxsize=65536)
        self._manifests: LRUCache[str, Manifest] = LRUCache(maxsize=4096)
        self._touched: set[str] = set()
        self._lock = threading.Lock()
        self.evictions = 0  # entries this process evicted; read by the proxy's metrics
        # Bytes of downloads in flight, which count against max_size too (`cache.flight` sets it).
        self.in_flight: Callable[[], int] = lambda: 0

    # -- blobs -------------------------------------------------------------------------

    def cached_blob_path(self, digest: str) -> tuple[str, int] | None:
        """Memory-only lookup for the hot path; `None` means "ask `find_blob`"."""
        with self._lock:
            found = self._paths.get(digest)
            if found is not None:
                self._touched.add(digest)
        return found

    def find_blob(self, digest: str) -> tuple[str, int] | None:
        """Blocking SQLite lookup; remembers the path so later hits stay in memory.

        A file whose size is not the one recorded when it was stored is removed, not returned.
        """
        handle = self._cache.get(digest, read=True)
        if handle is None:
            return None
        with handle:
            path = handle.name
            size = os.fstat(handle.fileno()).st_size
        recorded = self._cache._sql("SELECT size FROM Cache WHERE key = ? AND raw = 1", (digest,)).fetchone()
        if recorded is not None and recorded[0] != size:
            # Not the bytes that were stored (a disk that lost writes, a hand that truncated it):
            # forget it, so it is fetched again rather than served short.
            self.remove(digest)
            return None
        with self._lock:
            self._paths[digest] = (path, size)
        return path, size

    def forget_path(self, digest: str) -> None:
        """Called when a remembered file has been evicted by another process."""
        with self._lock:
            self._paths.pop(digest, None)

    def put_blob(self, digest: str, staged: Path, size: int | None = None) -> None:
        """Blocking: flush a verified file, move it into the cache and evict down to the size limit.

        `size` is the number of bytes that were verified: a file of another size (a write
        that came up short) raises `IncompleteFile` and is not stored.
        """
        fd = os.open(staged, os.O_RDONLY)
        try:
            actual = os.fstat(fd).st_size
            if size is not None and actual != size:
                raise IncompleteFile(f"{staged.name} holds {actual} bytes, not the {size} verified for {digest}")
            os.fsync(fd)  # before the rename: a power loss must not leave an entry with missing bytes
        finally:
            os.close(fd)
        self.flush_touches()  # so eviction sees the latest hits
        self._cache.set(digest, StagedFile(staged, actual))
        self._cull()

    def has_blob(self, digest: str) -> bool:
        return digest in self._cache

    # -- manifests ---------------------------------------------------------------------

    def cached_manifest(self, digest: str) -> Manifest | None:
        with self._lock:
            found = self._manifests.get(digest)
            if found is not None:
                self._touched.add(_MANIFEST + digest)
        return found

    def find_manifest(self, digest: str) -> Manifest | None:
        """Blocking SQLite lookup."""
        stored = self._cache.get(_MANIFEST + digest)
        if stored is None:
            return None
        media_type, body = stored
        manifest = Manifest(digest, media_type, body)
        with self._lock:
            self._manifests[digest] = manifest
        return manifest

    def put_manifest(self, manifest: Manifest) -> None:
        """Blocking. A manifest already stored is left as it is (same bytes; it may be pinned)."""
        with self._lock:
            self._manifests[manifest.digest] = manifest
        if _MANIFEST + manifest.digest in self._cache:
            return
        self.flush_touches()
        self._cache.set(_MANIFEST + manifest.digest, (manifest.media_type, manifest.body))
        self._cull()

    # -- pins and tools ----------------------------------------------------------------

    def pin(self, keys: Iterable[str]) -> None:
        """Blocking: keep these entries (blob digests, `manifest_key`s) out of eviction."""
        with self._cache.transact():
            for key in keys:
                self._cache._sql("UPDATE Cache SET tag = ? WHERE key = ? AND raw = 1", (PINNED, key))

    def keep_pinned(self, keys: set[str]) -> None:
        """Blocking: make `keys` the whole pinned set; entries pinned before and not named are unpinned."""
        with self._cache.transact():
            rows = self._cache._sql("SELECT key FROM Cache WHERE tag = ?", (PINNED,)).fetchall()
            for (key,) in rows:
                if key not in keys:
                    self._cache._sql("UPDATE Cache SET tag = NULL WHERE key = ? AND raw = 1", (key,))
            self.pin(keys)
        self._cull()  # what was unpinned may now be over the limit

    def entries(self) -> list[Entry]:
        """Blocking: every cached entry with its size, last use and pin."""
        self.flush_touches()
        # Small values (manifests) live inside SQLite, where diskcache records their size as 0.
        rows = self._cache._sql(
            "SELECT key, size + IFNULL(length(value), 0), access_time, tag FROM Cache WHERE raw = 1"
        ).fetchall()
        return [
            Entry(key.removeprefix(_MANIFEST), key.startswith(_MANIFEST), size, access_time, tag == PINNED)
            for key, size, access_time, tag in rows
        ]

    def remove(self, key: str) -> bool:
        """Blocking: delete a blob digest or `manifest_key`. A process that has the file open keeps reading it."""
        with self._lock:
            self._paths.pop(key, None)
            self._manifests.pop(key.removeprefix(_MANIFEST), None)
        return bool(self._cache.delete(key))

    # -- bookkeeping -------------------------------------------------------------------

    def flush_touches(self) -> int:
        """Blocking: record queued hits as recent uses, in one transaction."""
        with self._lock:
            keys, self._touched = self._touched, set()
        if not keys:
            return 0
        with self._cache.transact():
            for key in keys:
                # A read refreshes access_time under the LRU policy; the value is not needed.
                handle = self._cache.get(key, read=True)
                if hasattr(handle, "close"):
                    handle.close()
        return len(keys)

    def make_room(self, in_flight: int) -> int:
        """Blocking: evict until the entries and `in_flight` bytes fit in max_size.

        Returns the bytes left free; negative when pinned entries leave too little room,
        and then nothing is evicted (in vain).
        """
        self.flush_touches()
        evictable = self._cache._sql(
            "SELECT IFNULL(SUM(size), 0) FROM Cache WHERE tag IS NOT ? AND raw = 1", (PINNED,)
        ).fetchone()[0]
        at_best = self.max_size - (self._cache.volume() - evictable) - in_flight
        if at_best < 0:
            return at_best
        self._cull(in_flight)
        return self.max_size - self._cache.volume() - in_flight

    def _cull(self, in_flight: int | None = None) -> None:
        """Evict least recently used entries, one at a time, until they and the downloads in flight fit.

        diskcache's own `cull` removes ten entries per round, which for layers of
        hundreds of MiB would throw away far more than needed.
        """
        limit = self._cache.size_limit - (self.in_flight() if in_flight is None else in_flight)
        # Remembered paths of evicted files fail to open and fall back to `find_blob`;
        # remembered manifests stay correct, being immutable.
        for _ in range(100_000):
            if self._cache.volume() <= limit:
                return
            # diskcache has no public "least recently used key"; its schema is stable across 5.x.
            row = self._cache._sql(
                "SELECT key FROM Cache WHERE tag IS NOT ? ORDER BY access_time LIMIT 1", (PINNED,)
            ).fetchone()
            if row is None:
                return
            self._cache.delete(row[0])
            with self._lock:
                self.evictions += 1

    def volume(self) -> int:
        return self._cache.volume()

    def count(self) -> int:
        """Blocking: blobs and manifests stored."""
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()
