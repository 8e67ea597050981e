"""Manifests by digest and by tag: the store first, else the upstream; verified, stored, linked.

A tag is trusted for `tag_ttl`, then checked with a `HEAD`; while the upstream is
unavailable the last known digest is served (stale). Concurrent requests for the same
manifest share one upstream request. A record this process holds that is no longer fresh is
read again from the metadata first, where another worker or replica may have confirmed it
meanwhile, and a stale record is checked by one replica of the fleet, which claims it
(`Metadata.claim_tag_check`) while the others wait a moment for its answer: so the upstream is
asked once per `tag_ttl` for the whole fleet, not per process.
While the metadata cannot be reached, tags are asked upstream, or served stale from memory.
"""

from __future__ import annotations

import time

import anyio
import structlog
from anyio import to_thread

from cache import digests
from cache.mediatypes import manifest_media_type
from cache.storage import ContentStore, Manifest, Metadata, MetadataUnavailable, TagRecord
from proxy import errors
from proxy.mirror.failures import parsed, registry_error
from proxy.mirror.flights import SingleFlight
from proxy.mirror.links import Links
from proxy.mirror.outcome import Outcome
from proxy.routing import Route
from proxy.upstream.client import Upstream, UpstreamError, UpstreamNotFound, UpstreamUnavailable
from proxy.upstream.pool import Upstreams

log = structlog.get_logger("pullproxy")
Found = tuple[Manifest, Outcome]
CHECK_CLAIM = 5.0  # seconds a replica's claim to check a stale tag holds off the others
CHECK_WAIT = 1.0  # seconds the others wait for its answer before asking the upstream themselves
CHECK_POLL = 0.05


class Manifests:
    def __init__(
        self, store: ContentStore, meta: Metadata, upstreams: Upstreams, links: Links, tag_ttl: float, offline: bool
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.meta = meta
        self.links = links
        self.tag_ttl = tag_ttl
        self.offline = offline  # tags are answered from the cache, never revalidated
        self._tags: SingleFlight[tuple[str, str, str], Found] = SingleFlight()
        self._fetches: SingleFlight[tuple[str, str, str], Manifest] = SingleFlight()

    async def get(self, route: Route, reference: str) -> Found:
        """The manifest `reference` (a tag or a digest) names in `route`'s repository."""
        found = await (
            self._by_digest(route, reference) if digests.is_digest(reference) else self._by_tag(route, reference)
        )
        await self.links.record_manifest(route, found[0])
        return found

    async def stored(self, digest: str) -> Manifest | None:
        return self.store.cached_manifest(digest) or await to_thread.run_sync(self.store.find_manifest, digest)

    async def _by_digest(self, route: Route, digest: str) -> Found:
        parsed(digest)
        manifest = await self.stored(digest)
        if manifest is not None:
            await self.links.ensure(route, digest, blob=False)
            return manifest, Outcome.HIT
        fetched = await self._fetches.run(
            (route.upstream.name, route.repo, digest), lambda: self._fetch(route, digest, digest)
        )
        return fetched, Outcome.MISS

    async def _by_tag(self, route: Route, tag: str) -> Found:
        record = self.meta.cached_tag(route.upstream.name, route.repo, tag)
        if record is not None and self._fresh(record.checked_at):
            manifest = self.store.cached_manifest(record.digest)
            if manifest is not None:  # the hot path: memory only
                return manifest, Outcome.HIT
        return await self._tags.run((route.upstream.name, route.repo, tag), lambda: self._resolve(route, tag))

    def _fresh(self, checked_at: float) -> bool:
        return self.offline or time.time() - checked_at < self.tag_ttl

    async def _record(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """This process's record if fresh, else the shared one (fresher if someone confirmed it since)."""
        record = self.meta.cached_tag(upstream, repo, tag)
        if record is not None and self._fresh(record.checked_at):
            return record
        try:
            shared = await to_thread.run_sync(self.meta.find_tag, upstream, repo, tag)
        except MetadataUnavailable:
            return record  # memory only: revalidated with the upstream, or served stale
        if shared is None or (record is not None and record.checked_at > shared.checked_at):
            return record  # e.g. confirmed here while the shared metadata was away
        return shared

    async def _checked_elsewhere(self, upstream: str, repo: str, tag: str, stale: TagRecord) -> TagRecord:
        """`stale` as confirmed by the replica that claimed its check, if it does so within
        `CHECK_WAIT`; else `stale` (this replica checks it itself)."""
        try:
            claim = self.meta.claim_tag_check
            if await to_thread.run_sync(claim, upstream, repo, tag, stale.checked_at, CHECK_CLAIM):
                return stale
            deadline = time.monotonic() + CHECK_WAIT
            while time.monotonic() < deadline:
                await anyio.sleep(CHECK_POLL)
                record = await to_thread.run_sync(self.meta.find_tag, upstream, repo, tag)
                if record is not None and record.checked_at > stale.checked_at:
                    return record
        except MetadataUnavailable:
            pass
        return stale

    async def _set_tag(self, upstream: str, repo: str, tag: str, digest: str) -> None:
        try:
            await to_thread.run_sync(self.meta.set_tag, upstream, repo, tag, digest)
        except MetadataUnavailable as exc:  # the metadata keeps it in memory
            log.debug("tag not recorded", upstream=upstream, repo=repo, tag=tag, why=str(exc))

    async def _resolve(self, route: Route, tag: str) -> Found:
        upstream = self.upstreams.of(route)
        record = await self._record(upstream.name, route.repo, tag)
        if record is not None and not self._fresh(record.checked_at) and not _failing(upstream):
            record = await self._checked_elsewhere(upstream.name, route.repo, tag, record)
        cached = await self.stored(record.digest) if record else None
        if record is not None and cached is not None:
            if self._fresh(record.checked_at):
                return cached, Outcome.HIT
            try:
                current = await upstream.head_manifest(route.repo, tag)
            except UpstreamUnavailable as exc:
                log.warning("stale tag", upstream=upstream.name, repo=route.repo, tag=tag, why=str(exc))
                return cached, Outcome.STALE
            except UpstreamNotFound:
                raise errors.manifest_unknown(route.prefix + route.repo, tag) from None
            except UpstreamError as exc:
                raise registry_error(exc, route, tag) from None
            if current == record.digest:
                await self._set_tag(upstream.name, route.repo, tag, current)
                return cached, Outcome.REVALIDATED
            if current is not None:
                known = await self.stored(current)
                if known is not None:
                    await self._set_tag(upstream.name, route.repo, tag, current)
                    return known, Outcome.MISS
        manifest = await self._fetch(route, tag, None)
        await self._set_tag(upstream.name, route.repo, tag, manifest.digest)
        return manifest, Outcome.MISS

    async def _fetch(self, route: Route, reference: str, expected: str | None) -> Manifest:
        """GET from the upstream, verify against `expected` (or its own claim), store."""
        try:
            fetched = await self.upstreams.of(route).get_manifest(route.repo, reference)
        except UpstreamError as exc:
            raise registry_error(exc, route, reference) from None
        claimed = expected or fetched.digest
        try:
            digest = claimed if claimed else digests.of(fetched.body)
            if not digests.matches(digest, fetched.body):
                raise errors.bad_upstream(
                    f"{route.upstream.name} sent a manifest for {route.repo}:{reference} that does not match {digest}"
                )
        except digests.InvalidDigest:
            raise errors.bad_upstream(f"{route.upstream.name} claimed an invalid digest {claimed!r}") from None
        manifest = Manifest(digest, manifest_media_type(fetched.content_type, fetched.body), fetched.body)
        await to_thread.run_sync(self.store.put_manifest, manifest)
        return manifest


def _failing(upstream: Upstream) -> bool:
    """Its last answer was a failure: a stale tag is served at once, not after waiting for another replica."""
    error = upstream.last_error
    return upstream.backoff_until is not None or (error is not None and (upstream.last_ok or 0) <= error[0])
