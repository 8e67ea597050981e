"""How a registry request was answered with respect to the cache."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    HIT = "hit"  # from the cache, nothing asked upstream
    MISS = "miss"  # fetched from the upstream
    JOINED = "joined"  # read from a download another request started
    REVALIDATED = "revalidated"  # a cached tag the upstream confirmed with a HEAD
    STALE = "stale"  # the upstream was unavailable: the last known answer

    @property
    def from_cache(self) -> bool:
        return self in _FROM_CACHE


_FROM_CACHE = frozenset({Outcome.HIT, Outcome.REVALIDATED, Outcome.STALE})
