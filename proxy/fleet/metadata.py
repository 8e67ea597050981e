"""The metadata of a fleet: with `[coordination]`, tags, links and referrers live in its Redis."""

from __future__ import annotations

from cache.redis_meta import RedisMetadata, connect
from proxy.config import Config


def open_metadata(config: Config) -> RedisMetadata | None:
    """`RedisMetadata` on `[coordination] redis`, or None without `[coordination]` (metadata on disk).

    Connects lazily: a Redis that is down at start-up does not stop the replica, whose
    metadata then answers `MetadataUnavailable` until Redis is back.
    """
    if config.coordination is None:
        return None
    return RedisMetadata(connect(config.coordination.redis))
