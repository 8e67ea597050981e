"""The pull-through logic: answer from the cache, else from the upstream, verifying and storing.

Concurrent requests for the same manifest share one upstream request; concurrent
requests for the same blob share one download (see `cache.flight`). Cached content is
served under a repository only if that repository is known to hold it (see `proxy.links`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import httpx
import structlog
from anyio import to_thread

from cache import digests
from cache.flight import AlreadyCached, Downloads, Source
from cache.meta import Metadata
from cache.readers import BlobReader, DownloadReader, FileReader
from cache.store import ContentStore, Manifest
from proxy import errors
from proxy.config import Config
from proxy.links import Links
from proxy.mediatypes import manifest_media_type
from proxy.routing import Route, Router
from proxy.upstream import (
    MAX_MANIFEST_SIZE,
    TagPage,
    Upstream,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
    UpstreamOffline,
    UpstreamUnavailable,
)

log = structlog.get_logger("pullproxy")
T = TypeVar("T")

HIT, MISS, STALE, REVALIDATED = "hit", "miss", "stale", "revalidated"
EMPTY_INDEX = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'


@dataclass(slots=True)
class Blob:
    reader: BlobReader
    size: int | None
    outcome: str


class Mirror:
    def __init__(self, store: ContentStore, meta: Metadata, tag_ttl: float, offline: bool = False) -> None:
        self.store = store
        self.meta = meta
        self.links = Links(meta)
        self.downloads = Downloads(store)
        self.tag_ttl = tag_ttl
        self.offline = offline  # tags are answered from the cache, never revalidated
        self._flights: dict[tuple[str, ...], asyncio.Future[object]] = {}

    async def _once(self, key: tuple[str, ...], work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` once for all concurrent callers with the same key."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)  # type: ignore[return-value]

    # -- manifests ---------------------------------------------------------------------

    async def manifest(self, route: Route, reference: str) -> tuple[Manifest, str]:
        found = await self._manifest(route, reference)
        await self.links.record_manifest(route, found[0])
        return found

    async def _manifest(self, route: Route, reference: str) -> tuple[Manifest, str]:
        if digests.is_digest(reference):
            return await self._manifest_by_digest(route, reference)
        upstream = route.upstream.name
        record = self.meta.cached_tag(upstream, route.repo, reference)
        if record is not None and (self.offline or time.time() - record.checked_at < self.tag_ttl):
            manifest = self.store.cached_manifest(record.digest)
            if manifest is not None:
                return manifest, HIT
        return await self._once(("tag", upstream, route.repo, reference), lambda: self._resolve_tag(route, reference))

    async def _manifest_by_digest(self, route: Route, digest: str) -> tuple[Manifest, str]:
        _parsed(digest)
        manifest = await self._stored_manifest(digest)
        if manifest is not None:
            if not await self.links.holds(route, digest):
                await self._confirm(route, digest, blob=False)
            return manifest, HIT
        fetched = await self._once(
            ("manifest", route.upstream.name, route.repo, digest),
            lambda: self._fetch_manifest(route, digest, digest),
        )
        return fetched, MISS

    async def _resolve_tag(self, route: Route, tag: str) -> tuple[Manifest, str]:
        upstream = route.upstream
        record = self.meta.cached_tag(upstream.name, route.repo, tag) or await to_thread.run_sync(
            self.meta.find_tag, upstream.name, route.repo, tag
        )
        cached = await self._stored_manifest(record.digest) if record else None
        if record is not None and cached is not None:
            if self.offline or time.time() - record.checked_at < self.tag_ttl:
                return cached, HIT
            try:
                current = await upstream.head_manifest(route.repo, tag)
            except UpstreamUnavailable as exc:
                log.warning("stale tag", upstream=upstream.name, repo=route.repo, tag=tag, why=str(exc))
                return cached, STALE
            except UpstreamNotFound:
                raise errors.manifest_unknown(route.prefix + route.repo, tag) from None
            except UpstreamError as exc:
                raise self._error(exc, route, tag) from None
            if current == record.digest:
                await to_thread.run_sync(self.meta.set_tag, upstream.name, route.repo, tag, current)
                return cached, REVALIDATED
            if current is not None:
                known = await self._stored_manifest(current)
                if known is not None:
                    await to_thread.run_sync(self.meta.set_tag, upstream.name, route.repo, tag, current)
                    return known, MISS
        manifest = await self._fetch_manifest(route, tag, None)
        await to_thread.run_sync(self.meta.set_tag, upstream.name, route.repo, tag, manifest.digest)
        return manifest, MISS

    async def _stored_manifest(self, digest: str) -> Manifest | None:
        return self.store.cached_manifest(digest) or await to_thread.run_sync(self.store.find_manifest, digest)

    async def _fetch_manifest(self, route: Route, reference: str, expected: str | None) -> Manifest:
        """GET from the upstream, verify against `expected` (or its own claim), store."""
        try:
            fetched = await route.upstream.get_manifest(route.repo, reference)
        except UpstreamError as exc:
            raise self._error(exc, route, reference) from None
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

    # -- blobs -------------------------------------------------------------------------

    async def blob(self, route: Route, digest: str) -> Blob:
        """A reader for the blob: from disk, from a download in flight, or from a new one."""
        _parsed(digest)

        async def opener() -> Source:
            source = await route.upstream.open_blob(route.repo, digest)
            await self.links.record(route, [digest])  # before readers start: the upstream vouched
            return source

        for _ in range(3):  # another worker may commit the blob while we look
            cached = self.open_cached(digest) or await to_thread.run_sync(self._open_stored, digest)
            if cached is not None:
                await self._check_held(route, digest, cached)
                return Blob(cached, cached.size, HIT)
            joined = self.downloads.in_flight(digest) is not None
            download = self.downloads.join(digest, opener)
            reader = DownloadReader(download)
            try:
                await asyncio.shield(download.started)
            except AlreadyCached:
                reader.close()
                continue
            except UpstreamError as exc:
                reader.close()
                raise self._error(exc, route, digest, blob=True) from None
            except BaseException:
                reader.close()
                raise
            await self._check_held(route, digest, reader)  # the download may be another repository's
            return Blob(reader, download.size, "joined" if joined else MISS)
        raise errors.unavailable(f"blob {digest} could not be read from the cache")

    def open_cached(self, digest: str) -> FileReader | None:
        """Hot path: a blob whose path is remembered opens without SQLite or a thread."""
        found = self.store.cached_blob_path(digest)
        if found is None:
            return None
        try:
            return FileReader(os.open(found[0], os.O_RDONLY), found[1])
        except FileNotFoundError:  # evicted since; look it up again
            self.store.forget_path(digest)
            return None

    def _open_stored(self, digest: str) -> FileReader | None:
        """Blocking."""
        for _ in range(2):  # a second try covers an eviction between lookup and open
            found = self.store.find_blob(digest)
            if found is None:
                return None
            try:
                return FileReader(os.open(found[0], os.O_RDONLY), found[1])
            except FileNotFoundError:
                self.store.forget_path(digest)
        return None

    async def blob_size(self, route: Route, digest: str) -> tuple[int | None, str]:
        """For HEAD: answered from the cache or a running download, else by a HEAD upstream."""
        _parsed(digest)
        cached = self.store.cached_blob_path(digest) or await to_thread.run_sync(self.store.find_blob, digest)
        download = self.downloads.in_flight(digest)
        if cached is not None:
            size, outcome = cached[1], HIT
        elif download is not None and download.started.done() and download.error is None:
            size, outcome = download.size, "joined"
        else:
            return await self._confirm(route, digest, blob=True), MISS
        if not await self.links.holds(route, digest):
            await self._confirm(route, digest, blob=True)
        return size, outcome

    # -- links -------------------------------------------------------------------------

    async def _check_held(self, route: Route, digest: str, reader: BlobReader) -> None:
        """Before serving a blob: `route`'s repository holds it, or its upstream confirms it does."""
        if await self.links.holds(route, digest):
            return
        try:
            await self._confirm(route, digest, blob=True)
        except BaseException:
            reader.close()
            raise

    async def _confirm(self, route: Route, digest: str, blob: bool) -> int | None:
        """HEAD upstream: if the repository has `digest` there, link it (and return a blob's size)."""

        async def ask() -> int | None:
            try:
                if blob:
                    size = await route.upstream.head_blob(route.repo, digest)
                else:
                    await route.upstream.head_manifest(route.repo, digest)
                    size = None
            except UpstreamError as exc:
                raise self._error(exc, route, digest, blob=blob) from None
            await self.links.record(route, [digest])
            return size

        return await self._once(("confirm", route.upstream.name, route.repo, digest), ask)

    # -- referrers ---------------------------------------------------------------------

    async def referrers(self, route: Route, digest: str) -> tuple[bytes, str]:
        """The referrers index of `digest` (signatures, SBOMs), kept so offline clients get it too.

        From the upstream's referrers API, else its referrers tag (`<alg>-<hex>`), else empty.
        Nothing an index lists is linked to the repository: naming a digest proves nothing
        (see `proxy.links`); clients fetch the referrers by digest like any manifest. "None"
        is stored only for a manifest the repository holds, as anyone can ask about any
        digest; for others it is kept in memory (see `cache.meta`).
        """
        algorithm, hex_ = _parsed(digest)
        upstream = route.upstream
        known = await to_thread.run_sync(self.meta.referrers, upstream.name, route.repo, digest)
        if known is not None and time.time() - known[0] < self.tag_ttl:
            return known[1] or EMPTY_INDEX, HIT

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
                    index = (await self.manifest(route, f"{algorithm[:32]}-{hex_[:64]}"))[0].body
                except errors.RegistryError as exc:
                    if exc.status != 404:
                        raise
            found = index if index is not None and entries(index) else None
            if found is None and not await self.links.holds(route, digest):
                await to_thread.run_sync(self.meta.remember_no_referrers, upstream.name, route.repo, digest)
            else:
                await to_thread.run_sync(self.meta.set_referrers, upstream.name, route.repo, digest, found)
            return found

        try:
            index = await self._once(("referrers", upstream.name, route.repo, digest), fetch)
            return index or EMPTY_INDEX, MISS
        except UpstreamError as exc:
            error = self._error(exc, route, digest)
        except errors.RegistryError as exc:  # from the referrers tag
            error = exc
        if known is None or error.status not in (429, 503):
            raise error
        log.warning("stale referrers", upstream=upstream.name, repo=route.repo, digest=digest, why=error.message)
        return known[1] or EMPTY_INDEX, STALE

    # -- tags --------------------------------------------------------------------------

    async def tags(self, route: Route, n: str | None, last: str | None) -> tuple[TagPage, str]:
        try:
            page = await route.upstream.tags(route.repo, n, last)
        except UpstreamUnavailable as exc:
            known = await to_thread.run_sync(self.meta.known_tags, route.upstream.name, route.repo)
            if not known:
                if self.offline:
                    raise errors.offline(f"the tag list of {route.prefix + route.repo}") from None
                raise self._error(exc, route, "tags") from None
            if not self.offline:
                log.warning("stale tags", upstream=route.upstream.name, repo=route.repo, why=str(exc))
            return paginate(route.repo, known, n, last), HIT if self.offline else STALE
        except UpstreamError as exc:
            if isinstance(exc, UpstreamNotFound):
                raise errors.name_unknown(route.prefix + route.repo, f"repository {route.repo} not found") from None
            raise self._error(exc, route, "tags") from None
        if page.next_query is None and (n is not None or last is not None):
            # Some registries (distribution 2.8 among them) ignore n and last: apply them here.
            page = paginate(page.name, page.tags, n, last)
        return page, MISS

    async def repositories(self) -> list[tuple[str, str]]:
        return await to_thread.run_sync(self.meta.repositories)

    # -- errors ------------------------------------------------------------------------

    @staticmethod
    def _error(exc: UpstreamError, route: Route, reference: str, blob: bool = False) -> errors.RegistryError:
        name = route.prefix + route.repo
        if isinstance(exc, UpstreamOffline):
            return errors.offline(f"{name}@{reference}" if digests.is_digest(reference) else f"{name}:{reference}")
        if isinstance(exc, UpstreamNotFound):
            return errors.blob_unknown(reference) if blob else errors.manifest_unknown(name, reference)
        if isinstance(exc, UpstreamDenied):
            return errors.RegistryError(
                404,
                "BLOB_UNKNOWN" if blob else "MANIFEST_UNKNOWN",
                f"{route.upstream.name} refused access to {route.repo} (check the upstream's credentials)",
                {"name": name, "reference": reference},
            )
        if isinstance(exc, UpstreamUnavailable):
            if exc.status == 429:
                headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
                return errors.RegistryError(429, "TOOMANYREQUESTS", f"{exc}", headers=headers)
            error = errors.unavailable(f"{exc}")
            if exc.retry_after:  # e.g. the rest of a backoff window
                error.headers["Retry-After"] = exc.retry_after
            return error
        return errors.bad_upstream(f"{exc}")


def _parsed(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest a client sent; 400 DIGEST_INVALID when it is not one."""
    try:
        return digests.parse(digest)
    except digests.InvalidDigest:
        raise errors.digest_invalid(digest) from None


def paginate(name: str, tags: list[str], n: str | None, last: str | None) -> TagPage:
    """A `tags/list` page from the locally known tags, with the same n/last rules."""
    ordered = sorted(tags)
    if last is not None:
        ordered = [t for t in ordered if t > last]
    if n is not None and n.isdigit():
        count = int(n)
        if len(ordered) > count:
            page = ordered[:count]
            return TagPage(name, page, {"n": str(count), "last": page[-1]} if page else None)
        ordered = ordered[:count]
    return TagPage(name, ordered, None)


@contextlib.asynccontextmanager
async def open_mirror(
    config: Config, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> AsyncIterator[tuple[Router, Mirror]]:
    """The mirror and its router for `config`, as the server and every command use them.

    `transports` (by upstream name) lets in-process tests put a fake upstream behind httpx.
    """
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    store = await to_thread.run_sync(ContentStore, config.cache_dir, config.max_size)
    meta = await to_thread.run_sync(Metadata, config.cache_dir)
    transports = transports or {}
    upstreams = [Upstream(u, transport=transports.get(u.name), offline=config.offline) for u in config.upstreams]
    try:
        yield Router(upstreams), Mirror(store, meta, config.tag_ttl, offline=config.offline)
    finally:
        for upstream in upstreams:
            await upstream.aclose()
        await to_thread.run_sync(store.flush_touches)
        store.close()
        meta.close()
