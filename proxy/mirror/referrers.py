"""The OCI 1.1 referrers of a manifest (signatures, SBOMs), kept so offline clients get them too.

From the upstream's referrers API, else its referrers tag (`sha256-<hex>`), else an
empty index; cached for `tag_ttl` and served stale while the upstream is away.
"""

from __future__ import annotations

import time

import structlog
from anyio import to_thread

from cache.meta import Metadata
from proxy import errors
from proxy.mirror.failures import parsed, registry_error
from proxy.mirror.flights import SingleFlight
from proxy.mirror.links import Links, referenced_digests
from proxy.mirror.manifests import Manifests
from proxy.mirror.outcome import Outcome
from proxy.routing import Route
from proxy.upstream.client import UpstreamError
from proxy.upstream.pool import Upstreams

log = structlog.get_logger("pullproxy")
EMPTY_INDEX = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'


class Referrers:
    def __init__(
        self, meta: Metadata, upstreams: Upstreams, manifests: Manifests, links: Links, tag_ttl: float
    ) -> None:
        self.meta = meta
        self.upstreams = upstreams
        self.manifests = manifests
        self.links = links
        self.tag_ttl = tag_ttl
        self._fetches: SingleFlight[tuple[str, str, str], bytes] = SingleFlight()

    async def index(self, route: Route, digest: str) -> tuple[bytes, Outcome]:
        algorithm, hex_ = parsed(digest)
        upstream = self.upstreams.of(route)
        known = await to_thread.run_sync(self.meta.referrers, upstream.name, route.repo, digest)
        if known is not None and time.time() - known[0] < self.tag_ttl:
            return known[1], Outcome.HIT

        async def fetch() -> bytes:
            index = await upstream.referrers(route.repo, digest)
            if index is None:
                try:
                    index = (await self.manifests.get(route, f"{algorithm}-{hex_}"))[0].body
                except errors.RegistryError as exc:
                    if not isinstance(exc, errors.NotFound):
                        raise
                    index = EMPTY_INDEX
            await to_thread.run_sync(self.meta.set_referrers, upstream.name, route.repo, digest, index)
            await self.links.record(route, referenced_digests(index))  # so clients may fetch them
            return index

        try:
            return await self._fetches.run((upstream.name, route.repo, digest), fetch), Outcome.MISS
        except UpstreamError as exc:
            error = registry_error(exc, route, digest)
        except errors.RegistryError as exc:  # from the referrers tag
            error = exc
        if known is None or not isinstance(error, errors.Unavailable):
            raise error
        log.warning("stale referrers", upstream=upstream.name, repo=route.repo, digest=digest, why=error.message)
        return known[1], Outcome.STALE
