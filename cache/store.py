"""`DiskContentStore`: blobs and manifests by digest in a size-bounded, least-recently-used diskcache.

A blob enters the cache only by renaming a fully verified file into place, so a crash
never leaves a partial blob visible and a large layer is never copied a second time.
The file is flushed to the disk before the rename and its directory after it, both
before the SQLite row that makes it visible: after a power loss an entry either names
complete bytes or is gone.
Hits are served from an in-memory map of digest to file path; their LRU bookkeeping is
queued and written to SQLite in one transaction every few seconds instead of once per hit.
Pinned entries carry diskcache's `tag` "pinned" in the shared SQLite file, so every
process's eviction skips them (the SQL for that is in `cache.diskcache_sql`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

from cachetools import LRUCache

from cache.diskcache_sql import EvictionPolicy, SqlCache
from cache.storage import BlobFile, Entry, IncompleteFile, Manifest, is_manifest_key, key_digest, manifest_key


def hard_link(found: BlobFile, staged: Path) -> bool:
    """Give another store's verified file a second name, `staged`, to `put_blob`: the bytes are stored once.

    False when it cannot: the file was removed meanwhile, or `staged` is on another filesystem.
    """
    try:
        os.link(found.path, staged)
    except OSError:
        return False
    return True


class DiskContentStore:
    """Content-addressed storage shared by every upstream: a digest names the same bytes anywhere.

    Implements `cache.storage.ContentStore` in one directory shared by this host's processes.
    """

    def __init__(self, directory: Path, max_size: int) -> None:
        self.directory = directory
        self.max_size = max_size
        self.partial_dir = directory / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self._cache = SqlCache(
            directory / "content",
            EvictionPolicy.LEAST_RECENTLY_USED,
            size_limit=max_size,
            cull_limit=0,  # culled explicitly after each insert, down to the limit
            renaming=True,
        )
        self._paths: LRUCache[str, BlobFile] = LRUCache(maxsize=65536)
        self._manifests: LRUCache[str, Manifest] = LRUCache(maxsize=4096)
        self._touched: set[str] = set()
        self._lock = threading.Lock()
        self.evictions = 0  # entries this process evicted; read by the proxy's metrics
        # Bytes of downloads in flight, which count against max_size too (`cache.flight` sets it).
        self.in_flight: Callable[[], int] = lambda: 0

    # -- blobs -------------------------------------------------------------------------

    def cached_blob_path(self, digest: str) -> BlobFile | None:
        """Memory-only lookup for the hot path; `None` means "ask `find_blob`"."""
        with self._lock:
            found = self._paths.get(digest)
            if found is not None:
                self._touched.add(digest)
        return found

    def find_blob(self, digest: str) -> BlobFile | None:
        """Blocking SQLite lookup; remembers the path so later hits stay in memory.

        A file whose size is not the one recorded when it was stored is removed, not returned.
        """
        handle = self._cache.open_file(digest)
        if handle is None:
            return None
        with handle:
            path = handle.name
            size = os.fstat(handle.fileno()).st_size
        recorded = self._cache.recorded_size(digest)
        if recorded is not None and recorded != size:
            # Not the bytes that were stored (a disk that lost writes, a hand that truncated it):
            # forget it, so it is fetched again rather than served short.
            self.remove(digest)
            return None
        found = BlobFile(path, size)
        with self._lock:
            self._paths[digest] = found
        return found

    def stored_path(self, digest: str) -> str | None:
        """Blocking: the stored file of `digest` as it is, unchecked and never removed (for a
        verification that reports damage rather than repairing it)."""
        handle = self._cache.open_file(digest)
        if handle is None:
            return None
        with handle:
            return handle.name

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
        self._cache.move_in(digest, staged, actual)
        self._cull()

    def has_blob(self, digest: str) -> bool:
        return digest in self._cache

    # -- manifests ---------------------------------------------------------------------

    def cached_manifest(self, digest: str) -> Manifest | None:
        with self._lock:
            found = self._manifests.get(digest)
            if found is not None:
                self._touched.add(manifest_key(digest))
        return found

    def find_manifest(self, digest: str) -> Manifest | None:
        """Blocking SQLite lookup."""
        stored = self._cache.get(manifest_key(digest))
        if stored is None:
            return None
        media_type, body = cast(tuple[str, bytes], stored)
        manifest = Manifest(digest, media_type, body)
        with self._lock:
            self._manifests[digest] = manifest
        return manifest

    def put_manifest(self, manifest: Manifest) -> None:
        """Blocking. A manifest already stored is left as it is (same bytes; it may be pinned)."""
        with self._lock:
            self._manifests[manifest.digest] = manifest
        if manifest_key(manifest.digest) in self._cache:
            return
        self.flush_touches()
        self._cache.set(manifest_key(manifest.digest), (manifest.media_type, manifest.body))
        self._cull()

    # -- pins and tools ----------------------------------------------------------------

    def pin(self, keys: Iterable[str]) -> None:
        """Blocking: keep these entries (blob digests, `manifest_key`s) out of eviction."""
        with self._cache.transact():
            for key in keys:
                self._cache.set_pinned(key, True)

    def keep_pinned(self, keys: set[str]) -> None:
        """Blocking: make `keys` the whole pinned set; entries pinned before and not named are unpinned."""
        with self._cache.transact():
            for key in self._cache.pinned_keys():
                if key not in keys:
                    self._cache.set_pinned(key, False)
            self.pin(keys)
        self._cull()  # what was unpinned may now be over the limit

    def entries(self) -> list[Entry]:
        """Blocking: every cached entry with its size, last use and pin."""
        self.flush_touches()
        return [
            Entry(key_digest(row.key), is_manifest_key(row.key), row.size, row.access_time, row.pinned)
            for row in self._cache.rows()
        ]

    def remove(self, key: str) -> bool:
        """Blocking: delete a blob digest or `manifest_key`. A process that has the file open keeps reading it."""
        with self._lock:
            self._paths.pop(key, None)
            self._manifests.pop(key_digest(key), None)
        return self._cache.delete(key)

    # -- bookkeeping -------------------------------------------------------------------

    def flush_touches(self) -> int:
        """Blocking: record queued hits as recent uses, in one transaction."""
        with self._lock:
            keys, self._touched = self._touched, set()
        if not keys:
            return 0
        self._cache.touch(keys)
        return len(keys)

    def make_room(self, in_flight: int) -> int:
        """Blocking: evict until the entries and `in_flight` bytes fit in max_size.

        Returns the bytes left free; negative when pinned entries leave too little room,
        and then nothing is evicted (in vain).
        """
        self.flush_touches()
        evictable = self._cache.unpinned_volume()
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
            key = self._cache.least_recently_used()
            if key is None:
                return
            self._cache.delete(key)
            with self._lock:
                self.evictions += 1

    def volume(self) -> int:
        return self._cache.volume()

    def count(self) -> int:
        """Blocking: blobs and manifests stored."""
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()
