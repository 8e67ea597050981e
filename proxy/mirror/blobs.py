"""Blobs by digest: a cached file, a download in flight, or a new download from the upstream.

Concurrent requests for the same blob share one download (see `cache.flight`), which
belongs to the cache and goes on when its first client leaves. A cached blob is served
under a repository only if that repository holds it (see `links`).

A range the download has not reached yet is not waited for: `span` asks the upstream for
just those bytes (a lazy-pulling client reads a layer's tail first) while the one full
download goes on for the cache. Those bytes are passed on, never stored, and cannot be
verified, as no range can; only the full download's verified bytes are kept.
"""

from __future__ import annotations

import collections
import contextlib
import os
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog
from anyio import to_thread

from cache.flight import BlockingSource, DownloadFailed, DownloadReader, Downloads, Origin, Source
from cache.readers import BlobReader, FileReader
from cache.storage import BlobFile, ContentStore, Presigning
from cache.store import hard_link
from proxy import errors
from proxy.mirror.failures import parsed, registry_error
from proxy.mirror.links import Links
from proxy.mirror.outcome import Outcome
from proxy.routing import Route
from proxy.upstream.client import RangeSource, UpstreamError
from proxy.upstream.pool import Upstreams

log = structlog.get_logger("pullproxy")

# Upstream range requests at once: beyond these a range waits for the full download instead,
# so no client can make the mirror open connections to an upstream without bound.
MAX_RANGE_FETCHES = 8  # in this process
MAX_RANGE_FETCHES_PER_BLOB = 2
REDIRECT_EXPIRY = timedelta(minutes=5)  # `[storage] redirect`: how long a presigned URL handed out works

# A fleet's download origin (`proxy.fleet.peer.PeerFlight.origin`): given the digest and this
# replica's own upstream origin, the source of the download (the upstream's, or another replica's).
FleetOrigin = Callable[[str, Origin], Awaitable[Source | BlockingSource]]


class ColdRange:
    """A range the upstream answers: its bytes in `chunks`; `close` it when done, read or not."""

    def __init__(self, source: RangeSource, release: Callable[[], Awaitable[None]]) -> None:
        self.start, self.end, self.size = source.start, source.end, source.size
        self._source = source
        self._release: Callable[[], Awaitable[None]] | None = release

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        async for chunk in self._source.chunks:
            yield chunk

    async def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            await release()


@dataclass(slots=True)
class Blob:
    reader: BlobReader
    size: int | None
    outcome: Outcome


class Blobs:
    def __init__(
        self, store: ContentStore, upstreams: Upstreams, downloads: Downloads, links: Links, redirect: bool = False
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.downloads = downloads
        self.links = links
        self._presigning = store if redirect and isinstance(store, Presigning) else None
        self._range_fetches: collections.Counter[str] = collections.Counter()  # digest -> upstream ranges open
        # With [hosted]: the hosted store's verified file of a digest, taken instead of a download.
        self.hosted_blob: Callable[[str], BlobFile | None] | None = None
        self.fleet: FleetOrigin | None = None  # set by the app with [coordination]: replicas fetch once between them

    async def open(self, route: Route, digest: str) -> Blob:
        """A reader for the blob, which the caller must close."""
        parsed(digest)
        for _ in range(3):  # another worker may commit the blob, or fail to start it, while we look
            cached = self.open_cached(digest) or await to_thread.run_sync(self._open_stored, digest)
            if cached is not None:
                await self._ensure_held(route, digest, cached)
                return Blob(cached, cached.size, Outcome.HIT)
            if await self._from_hosted(route, digest):
                continue  # stored now, once for both
            try:
                found = await self.downloads.read(digest, lambda: self._open_upstream(route, digest))
            except UpstreamError as exc:
                raise registry_error(exc, route, digest, blob=True) from None
            if found is None:  # committed elsewhere just now: read the store
                continue
            await self._ensure_held(route, digest, found.reader)  # the download may be another repository's
            return Blob(found.reader, found.size, Outcome.JOINED if found.joined else Outcome.MISS)
        raise errors.unavailable(f"blob {digest} could not be read from the cache")

    async def redirect(self, route: Route, digest: str) -> str | None:
        """`[storage] redirect`: a presigned URL of the blob's object in the bucket, valid for
        `REDIRECT_EXPIRY`, once `route`'s repository is known to hold it; None: serve it here (not in
        the bucket, the bucket unreachable, or no redirects)."""
        if self._presigning is None:
            return None
        parsed(digest)
        url = await to_thread.run_sync(self._presigning.presigned_url, digest, REDIRECT_EXPIRY)
        if url is not None:
            await self.links.ensure(route, digest, blob=True)
        return url

    @staticmethod
    def at_hand(blob: Blob, end: int) -> bool:
        """Whether bytes up to `end` can be read from the cache or the download now, without waiting."""
        reader = blob.reader
        return not isinstance(reader, DownloadReader) or reader.available() > end

    async def span(self, route: Route, digest: str, blob: Blob, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes `start`..`end` (inclusive) of an open blob, in order, a chunk at a time.

        From the cache or the download when they are at hand; else from an upstream range
        request, falling back to waiting for the download when none may be opened now, when
        the upstream does not answer with that range, or where it breaks off.
        """
        offset = start
        if not self.at_hand(blob, end):
            async with contextlib.aclosing(self._upstream_span(route, digest, start, end)) as fetched:
                async for chunk in fetched:
                    offset += len(chunk)
                    yield chunk
        while offset <= end:
            chunk = await blob.reader.read(offset, end - offset + 1)
            if not chunk:
                raise DownloadFailed(f"blob {digest} ended at {offset}, before byte {end}")
            offset += len(chunk)
            yield chunk

    async def _upstream_span(self, route: Route, digest: str, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """What an upstream range request delivers of `start`..`end`: maybe nothing, maybe a part."""
        source = await self._open_range(route, digest, f"bytes={start}-{end}")
        if source is None:
            return
        try:
            if (source.start, source.end) != (start, end):
                log.info("upstream answered another range; waiting for the download", digest=digest)
                return
            async for chunk in source.chunks:
                yield chunk
        except UpstreamError as exc:
            log.info("upstream range broke off; the download serves the rest", digest=digest, why=str(exc))
        finally:
            await self._close_range(digest, source)

    async def _open_range(self, route: Route, digest: str, asked: str) -> RangeSource | None:
        """An upstream range request, counted against the limits until `_close_range`; None
        when the limits leave no room, the upstream refused, or did not answer with a range."""
        if sum(self._range_fetches.values()) >= MAX_RANGE_FETCHES or (
            self._range_fetches[digest] >= MAX_RANGE_FETCHES_PER_BLOB
        ):
            return None
        self._range_fetches[digest] += 1
        source: RangeSource | None = None
        try:
            source = await self.upstreams.of(route).open_blob_range(route.repo, digest, asked)
        except UpstreamError as exc:
            log.info("upstream range refused; the whole blob serves it", digest=digest, why=str(exc))
        finally:
            if source is None:
                self._release_range(digest)
        return source

    async def _close_range(self, digest: str, source: RangeSource) -> None:
        self._release_range(digest)
        await source.close()

    def _release_range(self, digest: str) -> None:
        self._range_fetches[digest] -= 1
        if self._range_fetches[digest] <= 0:
            del self._range_fetches[digest]

    async def cold_range(
        self, route: Route, digest: str, asked: str, expected: Callable[[int], tuple[int, int] | None]
    ) -> ColdRange | None:
        """A one-range GET of a blob neither cached nor being downloaded here: the upstream's
        range answer at once, and the full download started in the background for the cache.

        `asked` is the Range header to send, `expected(size)` the range it means for a blob of
        that size. The upstream's 206 vouches that the repository holds the blob, as a full
        answer does. None when this does not apply or the upstream did not answer exactly
        that range: then `open` serves it (and raises what a full GET would).
        """
        parsed(digest)
        if self.store.cached_blob_path(digest) is not None or self.downloads.in_flight(digest) is not None:
            return None
        if await to_thread.run_sync(self.store.find_blob, digest) is not None:
            return None
        if self.hosted_blob is not None and await to_thread.run_sync(self.hosted_blob, digest) is not None:
            return None  # `open` stores the hosted file instead of downloading
        source = await self._open_range(route, digest, asked)
        if source is None:
            return None
        if (source.start, source.end) != expected(source.size):
            log.info("upstream answered another range than asked", digest=digest)
            await self._close_range(digest, source)
            return None
        try:
            await self.links.record(route, [digest])
        except BaseException:
            await self._close_range(digest, source)
            raise
        if self.downloads.in_flight(digest) is None:
            # Started with no reader: one this process fetches runs on for the cache; following
            # another worker's (which runs on there) is given up at once.
            try:
                download = self.downloads.join(digest, lambda: self._open_upstream(route, digest))
            except (OSError, DownloadFailed) as exc:  # the range is served all the same; a later GET retries
                log.warning("the download of a ranged blob could not start", digest=digest, why=str(exc))
            else:
                download.acquire()
                download.release()
        return ColdRange(source, lambda: self._close_range(digest, source))

    async def size(self, route: Route, digest: str) -> tuple[int | None, Outcome]:
        """For HEAD: answered from the cache or a running download, else by a HEAD upstream."""
        parsed(digest)
        cached = self.store.cached_blob_path(digest) or await to_thread.run_sync(self.store.find_blob, digest)
        download = self.downloads.in_flight(digest)
        size: int | None
        if cached is not None:
            size, outcome = cached.size, Outcome.HIT
        elif download is not None and download.started.done() and download.error is None:
            size, outcome = download.size, Outcome.JOINED
        else:
            return await self.links.confirm(route, digest, blob=True), Outcome.MISS
        await self.links.ensure(route, digest, blob=True)
        return size, outcome

    async def _open_upstream(self, route: Route, digest: str, fleet: bool = True) -> Source | BlockingSource:
        """The download's origin: the upstream's answer, which also proves `route`'s repository
        holds the blob (recorded before any reader starts, so none of them asks again).
        In a fleet, another replica's download of it may be the origin instead (see `proxy.fleet.peer`)."""
        if fleet and self.fleet is not None:
            return await self.fleet(digest, lambda: self._open_upstream(route, digest, fleet=False))
        source = await self.upstreams.of(route).open_blob(route.repo, digest)
        await self.links.record(route, [digest])
        return source

    async def _from_hosted(self, route: Route, digest: str) -> bool:
        """Store the hosted file of `digest` in the cache too (a hard link, no download), once
        `route`'s upstream repository is known to hold it: a mirrored name serves no hosted bytes
        its upstream lacks. False when it is not hosted, too large for the cache, or downloading."""
        found = None
        if self.hosted_blob is not None and self.downloads.in_flight(digest) is None:
            found = await to_thread.run_sync(self.hosted_blob, digest)
        if found is None or found.size > self.store.max_size:
            return False
        await self.links.ensure(route, digest, blob=True)
        return await to_thread.run_sync(self._store_link, digest, found)

    def _store_link(self, digest: str, found: BlobFile) -> bool:
        """Blocking. True when the cache holds the blob now (another worker may have stored it meanwhile)."""
        if self.store.has_blob(digest):
            return True
        staged = self.store.partial_dir / f"{digest.replace(':', '-')}.{uuid.uuid4().hex}.hosted"
        if not hard_link(found, staged):
            return False
        try:
            self.store.put_blob(digest, staged, found.size)
        except OSError:  # the staged name removed meanwhile (a starting worker clears old files): download it
            staged.unlink(missing_ok=True)
            return False
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return True

    async def _ensure_held(self, route: Route, digest: str, reader: BlobReader) -> None:
        try:
            await self.links.ensure(route, digest, blob=True)
        except BaseException:
            reader.close()
            raise

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
