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

from cache.storage import BlobFile, ContentStore
from proxy.config import Backend, Config
from proxy.hosted.index import HostedIndex
from proxy.hosted.repository import HostedRepositories
from proxy.mirror.mirror import open_bucket_store

PREFIX = "hosted/"  # hosted objects in the bucket: hosted/blobs/sha256/<hex>, hosted/manifests/sha256/<hex>


def open_hosted(
    config: Config, cached: Callable[[str], BlobFile | None] | None = None, replica_url: str | None = None
) -> HostedRepositories | None:
    """`[hosted]`'s repositories, or None without `[hosted]`; `replica_url`: this replica's, in a fleet."""
    if config.hosted is None:
        return None
    directory = config.cache_dir / "hosted"
    index: HostedIndex | None = None
    content: ContentStore | None = None
    if config.coordination is not None:
        from cache.bucket import open_redis  # redis-py, loaded only with [coordination]
        from proxy.hosted.redis_index import RedisIndex

        index = RedisIndex(open_redis(config.coordination.redis))
    try:
        if config.storage.backend is Backend.S3:
            content = open_bucket_store(config, prefix=PREFIX, bounded=False, local_dir=directory)
        return HostedRepositories(
            config.hosted, directory, cached, content=content, index=index, replica_url=replica_url
        )
    except BaseException:
        if index is not None:
            index.close()
        raise
