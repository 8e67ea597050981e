"""The mirror: one component per kind of content, each composing the local store with the upstream.

As distribution's proxy stores wrap a local and a remote store, `Manifests`, `Blobs`,
`Tags` and `Referrers` answer from the cache when they can and from the route's upstream
otherwise; `Links` decides under which repositories cached content may be served.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx
from anyio import to_thread

from cache.flight import Downloads
from cache.meta import DiskMetadata
from cache.storage import ContentStore, Metadata
from cache.store import DiskContentStore
from proxy.config import Config
from proxy.fleet.metadata import open_metadata
from proxy.mirror.blobs import Blobs
from proxy.mirror.links import Links
from proxy.mirror.manifests import Manifests
from proxy.mirror.referrers import Referrers
from proxy.mirror.tags import Tags
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
        cls, store: ContentStore, meta: Metadata, upstreams: Upstreams, tag_ttl: float, offline: bool = False
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
            blobs=Blobs(store, upstreams, downloads, links),
            tags=Tags(meta, upstreams, offline),
            referrers=Referrers(meta, upstreams, manifests, links, tag_ttl),
        )


def open_storage(config: Config) -> tuple[ContentStore, Metadata]:
    """Blocking: the content store and the metadata for `config`, the one place that chooses their kind."""
    store = DiskContentStore(config.cache_dir, config.max_size)
    try:
        return store, open_metadata(config) or DiskMetadata(config.cache_dir)
    except BaseException:
        store.close()
        raise


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
        yield Router(config.upstreams), Mirror.build(store, meta, upstreams, config.tag_ttl, offline=config.offline)
    finally:
        await upstreams.aclose()
        await to_thread.run_sync(store.flush_touches)
        store.close()
        meta.close()
