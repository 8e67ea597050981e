"""The mirror: one component per kind of content, each composing the local store with the upstream.

As distribution's proxy stores wrap a local and a remote store, `Manifests`, `Blobs`,
`Tags` and `Referrers` answer from the cache when they can and from the route's upstream
otherwise; `Links` decides under which repositories cached content may be served.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from anyio import to_thread

from cache.flight import Downloads
from cache.meta import DiskMetadata
from cache.storage import ContentStore, Metadata
from cache.store import DiskContentStore
from proxy.config import Backend, Config
from proxy.mirror.blobs import Blobs
from proxy.mirror.links import Links
from proxy.mirror.manifests import Manifests
from proxy.mirror.referrers import Referrers
from proxy.mirror.tags import Tags
from proxy.ops import metrics
from proxy.routing import Router
from proxy.upstream.pool import Upstreams


@dataclass(frozen=True, slots=True)
class Mirror:
    store: ContentStore
    meta: Metadata
    upstreams: Upstreams
    downloads: Downloads
    links: Links
    manifests: Manifests
    blobs: Blobs
    tags: Tags
    referrers: Referrers

    @classmethod
    def build(
        cls,
        store: ContentStore,
        meta: Metadata,
        upstreams: Upstreams,
        tag_ttl: float,
        offline: bool = False,
        redirect: bool = False,
    ) -> Mirror:
        links = Links(meta, upstreams)
        downloads = Downloads(store)
        manifests = Manifests(store, meta, upstreams, links, tag_ttl, offline)
        return cls(
            store=store,
            meta=meta,
            upstreams=upstreams,
            downloads=downloads,
            links=links,
            manifests=manifests,
            blobs=Blobs(store, upstreams, downloads, links, redirect),
            tags=Tags(meta, upstreams, offline),
            referrers=Referrers(meta, upstreams, manifests, links, tag_ttl),
        )


def open_storage(config: Config) -> tuple[ContentStore, Metadata]:
    """Blocking: the content store and the metadata for `config`, the one place that chooses their kind."""
    store: ContentStore
    if config.storage.backend is Backend.S3:
        store = open_bucket_store(config)
    else:
        store = DiskContentStore(config.cache_dir, config.max_size)
    try:
        if config.coordination is None:
            return store, DiskMetadata(config.cache_dir)
        from proxy.fleet.metadata import open_metadata  # redis-py, loaded only with [coordination]

        return store, open_metadata(config) or DiskMetadata(config.cache_dir)
    except BaseException:
        store.close()
        raise


def open_bucket_store(
    config: Config, prefix: str = "cache/", bounded: bool = True, local_dir: Path | None = None
) -> ContentStore:
    """Blocking: `[storage]`'s bucket with `[coordination]`'s Redis as its index; the local tier in
    `local_dir` (default `[cache] dir`), bounded by `[cache] local_max_size`.

    `bounded=False`: a store that never evicts (hosted content, under a prefix of its own).
    """
    from cache.bucket import BucketContentStore, open_bucket, open_redis  # obstore and redis-py: only for s3

    storage, coordination = config.storage, config.coordination
    assert storage.endpoint is not None and storage.bucket is not None and coordination is not None  # config checks
    bucket = open_bucket(storage.endpoint, storage.bucket, storage.region, storage.access_key, storage.secret_key)
    local_max_size = config.max_size if config.local_max_size is None else config.local_max_size
    store = BucketContentStore(
        bucket,
        open_redis(coordination.redis),
        config.cache_dir if local_dir is None else local_dir,
        config.max_size if bounded else None,
        local_max_size,
        prefix=prefix,
    )
    store.observe = metrics.object_store_request
    return store


@contextlib.asynccontextmanager
async def open_mirror(
    config: Config, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> AsyncIterator[tuple[Router, Mirror]]:
    """The mirror and its router for `config`, as the server and every command use them.

    `transports` (by upstream name) lets in-process tests put a fake upstream behind httpx.
    """
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    store, meta = await to_thread.run_sync(open_storage, config)
    upstreams = Upstreams(config.upstreams, offline=config.offline, transports=transports)
    try:
        mirror = Mirror.build(
            store, meta, upstreams, config.tag_ttl, offline=config.offline, redirect=config.storage.redirect
        )
        yield Router(config.upstreams), mirror
    finally:
        await upstreams.aclose()
        await to_thread.run_sync(store.flush_touches)
        store.close()
        meta.close()
