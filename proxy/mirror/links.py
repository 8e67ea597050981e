"""Which repositories a cached digest may be served under.

The content store is shared by every repository (a digest names the same bytes
anywhere), but access is granted per repository: a blob or manifest cached through a
private repository must not be served under another name to whoever knows its digest.
A link says a repository holds a digest. It is recorded for a manifest served from that
repository and for what its content carries, as its kind defines it and as a registry
checks on push: an image's config and layers, an index's child manifests, an artifact
manifest's blobs, schema 1's fsLayers. Nothing else counts: a `subject`, any other field,
and what a referrers answer lists merely name a digest, which anyone can do. Links are
also recorded whenever that repository's upstream answered for the digest.
Cached content is served by digest only where a link exists; otherwise `ensure` asks
the upstream first (one `HEAD`, shared by concurrent callers). Links are looked up in
memory, then the metadata (SQLite, or the fleet's Redis); they are written only when new, so a
repeated pull writes nothing. While the metadata cannot be reached (`MetadataUnavailable`) a
link not in memory is asked of the upstream, and what is learnt is not lost (the metadata
keeps it in memory) but not waited for either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from anyio import to_thread

from cache.manifests import referenced_digests
from cache.storage import EXPANDED, LINKED, Manifest, Metadata, MetadataUnavailable
from proxy.mirror.failures import registry_error
from proxy.mirror.flights import SingleFlight
from proxy.routing import Route
from proxy.upstream.client import UpstreamError
from proxy.upstream.pool import Upstreams


class Links:
    def __init__(self, meta: Metadata, upstreams: Upstreams) -> None:
        self.meta = meta
        self.upstreams = upstreams
        self._confirming: SingleFlight[tuple[str, str, str], int | None] = SingleFlight()

    async def _level(self, route: Route, digest: str) -> int:
        key = (route.upstream.name, route.repo, digest)
        try:
            return self.meta.cached_link(*key) or await to_thread.run_sync(self.meta.find_link, *key)
        except MetadataUnavailable:
            return 0  # not known here: the upstream is asked

    async def _add(self, route: Route, levels: dict[str, int]) -> None:
        with contextlib.suppress(MetadataUnavailable):  # kept in memory by the metadata, written when it is back
            await to_thread.run_sync(self.meta.add_links, route.upstream.name, route.repo, levels)

    async def holds(self, route: Route, digest: str) -> bool:
        return await self._level(route, digest) >= LINKED

    async def record(self, route: Route, found: Iterable[str]) -> None:
        """`route`'s repository holds these digests."""
        new = {d: LINKED for d in found if not self.meta.cached_link(route.upstream.name, route.repo, d)}
        if new:
            await self._add(route, new)

    async def record_manifest(self, route: Route, manifest: Manifest) -> None:
        """`manifest` was served from `route`'s repository: it and all it references are there."""
        if await self._level(route, manifest.digest) >= EXPANDED:
            return
        levels = dict.fromkeys(referenced_digests(manifest.body, manifest.media_type), LINKED)
        levels[manifest.digest] = EXPANDED
        await self._add(route, levels)

    async def ensure(self, route: Route, digest: str, blob: bool) -> None:
        """Before serving cached content: `route`'s repository holds it, or its upstream confirms it."""
        if not await self.holds(route, digest):
            await self.confirm(route, digest, blob)

    async def confirm(self, route: Route, digest: str, blob: bool) -> int | None:
        """HEAD upstream: if the repository has `digest` there, link it (and return a blob's size)."""

        async def ask() -> int | None:
            upstream = self.upstreams.of(route)
            try:
                if blob:
                    size = await upstream.head_blob(route.repo, digest)
                else:
                    await upstream.head_manifest(route.repo, digest)
                    size = None
            except UpstreamError as exc:
                raise registry_error(exc, route, digest, blob=blob) from None
            await self.record(route, [digest])
            return size

        return await self._confirming.run((route.upstream.name, route.repo, digest), ask)
