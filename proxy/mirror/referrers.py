"""The OCI 1.1 referrers of a manifest (signatures, SBOMs), kept so offline clients get them too.

From the upstream's referrers API, else its referrers tag (`<alg>-<hex>`), else an
empty index; cached for `tag_ttl` and served stale while the upstream is away.
Nothing an index lists is linked to the repository: naming a digest proves nothing (see
`links`); clients fetch the referrers by digest like any manifest. "None" is stored only
for a manifest the repository holds, as anyone can ask about any digest; for others it
is kept in memory (see `cache.meta`).
"""

from __future__ import annotations

import json
import time

import structlog
from anyio import to_thread

from cache.mediatypes import OCI_INDEX
from cache.storage import Metadata, MetadataUnavailable, ReferrersRecord
from proxy import errors
from proxy.mirror.failures import parsed, registry_error
from proxy.mirror.flights import SingleFlight
from proxy.mirror.links import Links
from proxy.mirror.manifests import Manifests
from proxy.mirror.outcome import Outcome
from proxy.routing import Route
from proxy.upstream.client import MAX_MANIFEST_SIZE, UpstreamError
from proxy.upstream.pool import Upstreams

log = structlog.get_logger("pullproxy")
EMPTY_INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, separators=(",", ":")).encode()


class Referrers:
    def __init__(
        self, meta: Metadata, upstreams: Upstreams, manifests: Manifests, links: Links, tag_ttl: float
    ) -> None:
        self.meta = meta
        self.upstreams = upstreams
        self.manifests = manifests
        self.links = links
        self.tag_ttl = tag_ttl
        self._fetches: SingleFlight[tuple[str, str, str], bytes | None] = SingleFlight()

    async def index(self, route: Route, digest: str) -> tuple[bytes, Outcome]:
        algorithm, hex_ = parsed(digest)
        upstream = self.upstreams.of(route)
        known = await self._known(upstream.name, route.repo, digest)
        if known is not None and time.time() - known.checked_at < self.tag_ttl:
            return known.body or EMPTY_INDEX, Outcome.HIT

        def entries(index: bytes) -> list[object]:
            try:
                parsed = json.loads(index)
            except ValueError:
                parsed = None
            if len(index) > MAX_MANIFEST_SIZE or not isinstance(parsed, dict):
                raise errors.bad_upstream(f"{upstream.name} sent a referrers answer that is not an image index")
            listed = parsed.get("manifests", [])
            if not isinstance(listed, list):
                raise errors.bad_upstream(f"{upstream.name} sent a referrers index without a list of manifests")
            return listed

        async def fetch() -> bytes | None:
            index = await upstream.referrers(route.repo, digest)
            if index is None:
                try:  # the spec's tag: algorithm and hex truncated to 32 and 64 characters
                    index = (await self.manifests.get(route, f"{algorithm[:32]}-{hex_[:64]}"))[0].body
                except errors.RegistryError as exc:
                    if not isinstance(exc, errors.NotFound):
                        raise
                    index = None
            found = index if index is not None and entries(index) else None
            try:
                if found is None and not await self.links.holds(route, digest):
                    await to_thread.run_sync(self.meta.remember_no_referrers, upstream.name, route.repo, digest)
                else:
                    await to_thread.run_sync(self.meta.set_referrers, upstream.name, route.repo, digest, found)
            except MetadataUnavailable:
                pass  # answered, not kept: asked again next time
            return found

        try:
            index = await self._fetches.run((upstream.name, route.repo, digest), fetch)
            return index or EMPTY_INDEX, Outcome.MISS
        except UpstreamError as exc:
            error = registry_error(exc, route, digest)
        except errors.RegistryError as exc:  # from the referrers tag
            error = exc
        if known is None or not isinstance(error, errors.Unavailable):
            raise error
        log.warning("stale referrers", upstream=upstream.name, repo=route.repo, digest=digest, why=error.message)
        return known.body or EMPTY_INDEX, Outcome.STALE

    async def _known(self, upstream: str, repo: str, digest: str) -> ReferrersRecord | None:
        try:
            return await to_thread.run_sync(self.meta.referrers, upstream, repo, digest)
        except MetadataUnavailable:
            return None  # the upstream is asked
