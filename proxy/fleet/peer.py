"""Fleet single flight: one upstream download of a cold blob for all replicas.

A replica about to download a blob (`Blobs`' download origin, with `[coordination]` and a
`peer_secret`) asks for the blob's lease (`proxy.fleet.lease`). The holder fetches from
the upstream as a lone replica would; every other replica's download takes its bytes from
the holder instead, with `GET <holder>/_pullproxy/peer/blobs/<digest>` and a peer
credential. The holder answers from its download in flight, bytes as they arrive, the
last one only once verified and committed (`cache.flight` holds it back), or from its
cache; if its download fails or it dies, the transfer breaks off. A follower's download is
an ordinary one: it verifies and commits the bytes itself, and a transfer that breaks off
fails it, so its clients see a broken response, never a clean end of wrong bytes.

Nothing leaks through the peer path: the holder answers only requests with a valid peer
credential, and a follower serves its clients only after its own access check (and, for
its clients' repository, the same link check as for any download another client started).

When the holder cannot be reached (it died, or it had no such download), the follower
waits for the lease to be released or to expire, and takes it over; when Redis cannot be
reached, or the wait runs out, or peers refuse the credential, it fetches on its own.
Ranged GETs of a cold blob still go to the upstream (`Blobs.cold_range`); their background
download goes through here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import structlog
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cache.flight import AlreadyCached, BlockingSource, DownloadFailed, DownloadReader, Origin, Source
from cache.readers import BlobReader, FileReader
from cache.storage import ContentStore
from proxy import errors
from proxy.config import Config
from proxy.fleet import lease
from proxy.fleet.lease import Claim, Holder, Lease, Leases
from proxy.fleet.peers import HEADER, PeerCredentials, Replica, this_replica
from proxy.http.responses import BlobResponse, blob_headers
from proxy.mirror import Mirror
from proxy.mirror.failures import parsed
from proxy.ops import metrics
from proxy.ops.metrics import FetchedBy, PeerSource
from proxy.tls.upstream import system_trust

log = structlog.get_logger("pullproxy")

BLOB_PATH = "/_pullproxy/peer/blobs/{digest}"
CONNECT_TIMEOUT = 1.0  # seconds: replicas are close; a dead one refuses at once or not at all
READ_TIMEOUT = 60.0  # seconds without a byte from a peer (it may be waiting on its upstream)
POOL_TIMEOUT = 1.0  # seconds to wait for a free connection to peers before fetching alone
MAX_PEER_CONNECTIONS = 64  # per process: each followed download holds one for its whole transfer
WAIT_STEP = 0.2  # seconds between looks at a lease whose holder cannot serve
WAIT_LIMIT = lease.TTL + 2 * lease.RENEW_EVERY  # a dead holder's lease is gone by then
# Seconds without a byte from the holder after which its lease is looked at: a holder that hangs
# (or is cut off) stops renewing, so once its lease is gone the transfer is given up, long before
# READ_TIMEOUT. A live holder waiting on a slow upstream keeps its lease, and its followers wait.
STALL = lease.TTL


class PeerUnavailable(Exception):
    """The peer could not serve the request now (unreachable, or no such download there)."""


class PeerRefused(Exception):
    """The peer will not serve us: it refused our credential (the replicas do not share one
    `peer_secret`), or it is at its limits (429, 503), or we are at ours (no connection free)."""


class PeerClient:
    """Requests to other replicas, each with a credential for exactly that request. Responses are
    streamed: the caller closes them."""

    def __init__(self, credentials: PeerCredentials, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.credentials = credentials
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT, pool=POOL_TIMEOUT),
            limits=httpx.Limits(max_connections=MAX_PEER_CONNECTIONS, max_keepalive_connections=8),
            follow_redirects=False,
            verify=system_trust(),  # an https advertise_url is checked as upstreams are
            transport=transport,
            headers={"User-Agent": "pullproxy-peer/0.1", "Accept-Encoding": "identity"},
        )

    async def send(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
    ) -> httpx.Response:
        """`method` on `path` (query included) of the replica at `base_url`. Raises httpx's errors."""
        request = self._client.build_request(method, base_url.rstrip("/") + path, headers=headers, content=content)
        request.headers[HEADER] = self.credentials.issue(method, request.url.raw_path.decode("ascii"))
        return await self._client.send(request, stream=True)

    async def aclose(self) -> None:
        await self._client.aclose()


def authenticate(request: Request, credentials: PeerCredentials | None) -> str:
    """The id of the replica that sent `request`; 401 without a peer credential, 403 with a wrong one."""
    value = request.headers.get(HEADER)
    if not value:
        raise errors.Unauthorized("peer requests need a peer credential")
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    target = raw_path.decode("latin-1")
    if request.scope.get("query_string"):
        target += "?" + request.scope["query_string"].decode("latin-1")
    replica = None if credentials is None else credentials.check(value, request.method, target)
    if replica is None:
        raise errors.Denied("the peer credential is not valid here")
    return replica


class PeerFlight:
    """The download origin of a cold blob on a replica of a fleet: the upstream, or the lease holder."""

    def __init__(self, leases: Leases, peers: PeerClient, wait_limit: float = WAIT_LIMIT, stall: float = STALL) -> None:
        self.leases = leases
        self.peers = peers
        self.replica = leases.replica
        self.wait_limit = wait_limit
        self.stall = stall

    async def origin(self, digest: str, upstream: Origin) -> Source | BlockingSource:
        """The bytes of `digest` for this replica's download: `upstream()` when this replica takes the
        lease (held until the source is closed) or cannot coordinate, else the holder's download."""
        deadline = time.monotonic() + self.wait_limit
        waited = False
        while True:
            claim, found = await self.leases.claim(digest)
            if claim is Claim.TAKEN:
                assert isinstance(found, Lease)
                return await self._fetch(digest, upstream, found)
            if claim is Claim.ALONE:
                return await self._alone(upstream)
            assert isinstance(found, Holder)
            if found.url and found.url != self.replica.url:
                try:
                    return await self._from_peer(found, digest)
                except PeerRefused as exc:
                    log.warning("the lease holder will not serve us: fetching alone", digest=digest, why=str(exc))
                    return await self._alone(upstream)
                except PeerUnavailable as exc:
                    log.info("the lease holder cannot serve; waiting for its lease", digest=digest, why=str(exc))
            # The holder is unreachable, or is this replica (another worker, finishing): its lease goes soon.
            if time.monotonic() >= deadline:
                log.warning("the lease of a blob outlived its holder; fetching alone", digest=digest)
                return await self._alone(upstream)
            if not waited:
                waited = True
                metrics.FLEET_LEASE_WAITS.inc()
            await asyncio.sleep(WAIT_STEP)

    async def _fetch(self, digest: str, upstream: Origin, held: Lease) -> Source | BlockingSource:
        try:
            source = await upstream()
        except BaseException:
            await held.release()
            raise
        metrics.FLEET_FETCHES.labels(FetchedBy.SELF).inc()
        if isinstance(source, BlockingSource):
            # Closed by the download's own thread: the lease is released on the loop.
            loop = asyncio.get_running_loop()
            blocking = source

            def close_blocking() -> None:
                try:
                    blocking.close()
                finally:
                    asyncio.run_coroutine_threadsafe(held.release(), loop)

            return BlockingSource(blocking.size, blocking.chunks, close_blocking)
        streaming = source

        async def close() -> None:
            try:
                await streaming.close()
            finally:
                await held.release()

        return Source(streaming.size, streaming.chunks, close)

    async def _alone(self, upstream: Origin) -> Source | BlockingSource:
        source = await upstream()
        metrics.FLEET_FETCHES.labels(FetchedBy.ALONE).inc()
        return source

    async def _from_peer(self, holder: Holder, digest: str) -> Source:
        """The holder's answer as a download source; raises PeerUnavailable or PeerRefused before any byte."""
        try:
            response = await self.peers.send("GET", holder.url, BLOB_PATH.format(digest=digest))
        except httpx.PoolTimeout:
            raise PeerRefused(f"all {MAX_PEER_CONNECTIONS} connections to peers are busy") from None
        except httpx.HTTPError as exc:
            raise PeerUnavailable(f"{holder.url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            await response.aclose()
            if response.status_code in (401, 403, 429, 503):
                raise PeerRefused(f"{holder.url} answered {response.status_code}")
            raise PeerUnavailable(f"{holder.url} answered {response.status_code}")
        length = response.headers.get("Content-Length", "")
        size = int(length) if length.isdigit() else None
        metrics.FLEET_FETCHES.labels(FetchedBy.PEER).inc()
        log.info("following another replica's download", digest=digest, peer=holder.url)

        async def chunks() -> AsyncIterator[bytes]:
            received = response.aiter_raw()
            step: asyncio.Future[bytes] | None = None
            try:
                while True:
                    step = asyncio.ensure_future(anext(received))
                    while not (await asyncio.wait({step}, timeout=self.stall))[0]:
                        if await self.leases.held_by(digest, holder) is False:  # hung, or cut off from us
                            why = f"{holder.url} sent nothing for {self.stall:.0f}s and no longer holds the lease"
                            raise DownloadFailed(f"the transfer of {digest} stalled: {why}")
                    try:
                        chunk = step.result()
                    except StopAsyncIteration:
                        return
                    metrics.FLEET_PEER_BYTES.inc(len(chunk))
                    yield chunk
            except httpx.HTTPError as exc:
                why = f"the transfer of {digest} from {holder.url} broke off ({type(exc).__name__})"
                raise DownloadFailed(why) from exc
            finally:
                if step is not None and not step.done():
                    step.cancel()

        return Source(size, chunks(), response.aclose)


@dataclass
class Fleet:
    """This replica's part in a fleet: who it is, its credentials, and (with a peer secret) its single flight."""

    replica: Replica
    credentials: PeerCredentials
    peers: PeerClient
    flight: PeerFlight | None  # None without a peer secret: each replica fetches on its own
    several_workers: bool  # a peer request may reach a worker other than the one downloading

    async def aclose(self) -> None:
        await self.peers.aclose()
        if self.flight is not None:
            await self.flight.leases.aclose()


def open_fleet(config: Config, replica: Replica | None = None) -> Fleet | None:
    """The fleet part for `config`; None without `[coordination]`."""
    coordination = config.coordination
    if coordination is None:
        return None
    replica = replica or this_replica(config)
    credentials = PeerCredentials(coordination.peer_secret, replica)
    peers = PeerClient(credentials)
    flight = None
    if credentials.enabled:
        flight = PeerFlight(Leases(lease.connect(coordination.redis), replica), peers)
    else:
        log.info("no [coordination] peer_secret: each replica downloads cold blobs on its own")
    return Fleet(replica, credentials, peers, flight, config.workers > 1)


# -- the owner's side -------------------------------------------------------------------


async def blob(request: Request) -> Response:
    """`GET /_pullproxy/peer/blobs/<digest>`: another replica follows this one's download or cache."""
    fleet: Fleet | None = getattr(request.app.state, "peer_fleet", None)
    authenticate(request, None if fleet is None else fleet.credentials)
    assert fleet is not None  # authenticate refuses every request without one
    digest = request.path_params["digest"]
    parsed(digest)
    mirror: Mirror = request.app.state.mirror
    reader, source = await _open(mirror, digest, fleet.several_workers)
    metrics.FLEET_PEER_SERVED.labels(source).inc()
    if reader is None:
        raise errors.blob_unknown(digest)
    return BlobResponse(reader, reader.size, blob_headers(digest))


async def _open(mirror: Mirror, digest: str, several_workers: bool) -> tuple[BlobReader | None, PeerSource]:
    """A reader of the blob from the cache or a download in flight here; it never starts a download."""
    cached = mirror.blobs.open_cached(digest) or await to_thread.run_sync(_open_stored, mirror.store, digest)
    if cached is not None:
        return cached, PeerSource.CACHE
    download = mirror.downloads.in_flight(digest)
    if download is None and several_workers:  # another worker of this replica may run it: follow it
        download = mirror.downloads.join(digest, _not_here)
    if download is None or download.error is not None:
        return None, PeerSource.NONE
    reader = DownloadReader(download)
    try:
        await asyncio.shield(download.started)
    except AlreadyCached:
        reader.close()
        stored = await to_thread.run_sync(_open_stored, mirror.store, digest)
        return stored, PeerSource.NONE if stored is None else PeerSource.CACHE
    except Exception:  # the download failed before it started (the upstream refused, say)
        reader.close()
        return None, PeerSource.NONE
    return reader, PeerSource.DOWNLOAD


async def _not_here() -> Source:
    """The origin of a download a peer request found no one running: it is not started."""
    raise DownloadFailed("no download of this blob runs on this replica")


def _open_stored(store: ContentStore, digest: str) -> FileReader | None:
    """Blocking: the stored blob, opened (None if it is not stored, or was evicted meanwhile)."""
    found = store.find_blob(digest)
    if found is None:
        return None
    try:
        return FileReader(os.open(found[0], os.O_RDONLY), found[1])
    except FileNotFoundError:
        store.forget_path(digest)
        return None


routes = [Route(BLOB_PATH.replace("{digest}", "{digest:str}"), blob, methods=["GET"])]
