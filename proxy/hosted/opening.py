"""`open_hosted`: the one place that builds hosted repositories' content store and index from the configuration.

Without `[coordination]`: one host's, in `<cache dir>/hosted` (a `DiskContentStore` that never
evicts and the SQLite `Index`), as it always was. With `[coordination]`: the `RedisIndex` every
replica shares, and with `[storage] backend = "s3"` the content in the shared bucket under
`hosted/`, never evicted (`max_size=None`; `[hosted] max_size` bounds it), `<cache dir>/hosted`
being this replica's hot tier. `[coordination]` with `backend = "disk"` shares the index only:
that fits replicas on one host sharing one cache directory; replicas on several hosts need the
bucket for hosted content to be served by every one. Blocking: call it in a thread.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from cache.storage import BlobFile
from proxy.config import Config
from proxy.hosted.index import HostedIndex
from proxy.hosted.redis_index import RedisIndex
from proxy.hosted.repository import HostedRepositories

REDIS_TIMEOUT = 10.0  # seconds a Redis round trip may take before the request fails


def open_hosted(
    config: Config, cached: Callable[[str], BlobFile | None] | None = None, replica_url: str | None = None
) -> HostedRepositories | None:
    """`[hosted]`'s repositories, or None without `[hosted]`; `replica_url`: this replica's, in a fleet."""
    if config.hosted is None:
        return None
    directory = config.cache_dir / "hosted"
    index: HostedIndex | None = None
    if config.coordination is not None:
        client = redis.Redis.from_url(
            config.coordination.redis, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        index = RedisIndex(client)
    return HostedRepositories(config.hosted, directory, cached, index=index, replica_url=replica_url)
