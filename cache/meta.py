"""`DiskMetadata`: what each upstream repository's tags pointed at, the tag lists it last answered, and
which digests each repository is known to hold (its links).

Kept apart from the content cache: these records are tiny, are never evicted by the LRU,
and are keyed by upstream so one repository name on two registries never mixes.
Tag records and links are also held in memory so hits are answered without SQLite.

Referrers answers are different: anyone may ask about any digest, so they are kept in a
store of their own with a size bound (the least recently stored go first), and "no
referrers" for a digest no repository is known to hold, the answer for every made-up
digest, only in bounded memory.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import cast

from cachetools import LRUCache

from cache.diskcache_sql import EvictionPolicy, SqlCache
from cache.storage import ReferrersRecord, TagRecord

REFERRERS_SIZE = 64 << 20  # bytes of stored referrers indexes (typically under 1 KiB each)
NO_REFERRERS = 8192  # digests remembered, per process, as having none


class DiskMetadata:
    """Implements `cache.storage.Metadata` in two diskcache directories beside the content."""

    def __init__(self, directory: Path, referrers_size: int = REFERRERS_SIZE) -> None:
        self._db = SqlCache(directory / "meta", EvictionPolicy.NONE)
        self._referrers = SqlCache(
            directory / "referrers", EvictionPolicy.LEAST_RECENTLY_STORED, size_limit=referrers_size
        )
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(maxsize=16384)
        self._links: LRUCache[tuple[str, str, str], int] = LRUCache(maxsize=65536)
        self._no_referrers: LRUCache[tuple[str, str, str], float] = LRUCache(maxsize=NO_REFERRERS)
        self._lock = threading.Lock()

    def cached_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """Memory-only lookup for the hot path."""
        with self._lock:
            return self._tags.get((upstream, repo, tag))

    def find_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """Blocking."""
        record = cast(TagRecord | None, self._db.get(("tag", upstream, repo, tag)))
        if record is not None:
            with self._lock:
                self._tags[(upstream, repo, tag)] = record
        return record

    def set_tag(self, upstream: str, repo: str, tag: str, digest: str) -> TagRecord:
        """Blocking."""
        record = TagRecord(digest, time.time())
        with self._db.transact():
            self._db.set(("tag", upstream, repo, tag), record)
            known = self._tag_list(upstream, repo)
            if tag not in known:
                self._db.set(("tags", upstream, repo), tuple(sorted({*known, tag})))
            repos = self._repositories()
            if (upstream, repo) not in repos:
                self._db.set(("repos",), tuple(sorted({*repos, (upstream, repo)})))
        with self._lock:
            self._tags[(upstream, repo, tag)] = record
        return record

    def remove_tag(self, upstream: str, repo: str, tag: str) -> None:
        """Blocking. A running server may still answer from its memory until `tag_ttl` has passed."""
        with self._db.transact():
            self._db.delete(("tag", upstream, repo, tag))
            known = tuple(t for t in self._tag_list(upstream, repo) if t != tag)
            self._db.set(("tags", upstream, repo), known)
            if not known:
                repos = self._repositories()
                self._db.set(("repos",), tuple(r for r in repos if r != (upstream, repo)))
        with self._lock:
            self._tags.pop((upstream, repo, tag), None)

    def referrers(self, upstream: str, repo: str, digest: str) -> ReferrersRecord | None:
        """Blocking: when the referrers of `digest` were last fetched and their index (None:
        there were none); None when nothing is known."""
        key = (upstream, repo, digest)
        with self._lock:
            checked_at = self._no_referrers.get(key)
        if checked_at is not None:
            return ReferrersRecord(checked_at, None)
        record = cast(tuple[float, bytes | None] | None, self._referrers.get(key))
        return None if record is None else ReferrersRecord(*record)

    def set_referrers(self, upstream: str, repo: str, digest: str, index: bytes | None) -> None:
        """Blocking: store `digest`'s referrers index as just fetched; None for "there are none"."""
        key = (upstream, repo, digest)
        self._referrers.set(key, (time.time(), index))
        with self._lock:
            self._no_referrers.pop(key, None)

    def remember_no_referrers(self, upstream: str, repo: str, digest: str) -> None:
        """Blocking: `digest` has no referrers now; kept in memory only."""
        key = (upstream, repo, digest)
        with self._lock:
            self._no_referrers[key] = time.time()
        if key in self._referrers:  # gone upstream: no older index may come back later
            self._referrers.delete(key)

    def cached_link(self, upstream: str, repo: str, digest: str) -> int:
        """Memory-only lookup for the hot path: LINKED, EXPANDED, or 0 for "ask `find_link`"."""
        with self._lock:
            return self._links.get((upstream, repo, digest), 0)

    def find_link(self, upstream: str, repo: str, digest: str) -> int:
        """Blocking."""
        level = cast(int, self._db.get(("link", upstream, repo, digest), 0))
        if level:
            with self._lock:
                self._links[(upstream, repo, digest)] = level
        return level

    def add_links(self, upstream: str, repo: str, levels: dict[str, int]) -> None:
        """Blocking: record that `repo` holds these digests, in one transaction; levels only rise."""
        with self._db.transact():
            for digest, level in levels.items():
                key = ("link", upstream, repo, digest)
                stored = cast(int, self._db.get(key, 0))
                if stored < level:
                    self._db.set(key, level)
                with self._lock:
                    self._links[(upstream, repo, digest)] = max(level, stored)

    def claim_tag_check(self, upstream: str, repo: str, tag: str, checked_at: float, seconds: float) -> bool:
        """Always: one host's workers each check (one request per worker), as before."""
        return True

    def known_tags(self, upstream: str, repo: str) -> list[str]:
        """Blocking: tags this cache has seen, for answering `tags/list` while offline."""
        return list(self._tag_list(upstream, repo))

    def repositories(self) -> list[tuple[str, str]]:
        """Blocking: every (upstream, repository) with a cached tag."""
        return list(self._repositories())

    def _tag_list(self, upstream: str, repo: str) -> tuple[str, ...]:
        return cast(tuple[str, ...], self._db.get(("tags", upstream, repo), ()))

    def _repositories(self) -> tuple[tuple[str, str], ...]:
        return cast(tuple[tuple[str, str], ...], self._db.get(("repos",), ()))

    def close(self) -> None:
        self._db.close()
        self._referrers.close()
