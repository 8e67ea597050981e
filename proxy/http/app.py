"""The ASGI application: wiring of config, cache, upstreams and routes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import structlog
from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cache import flight
from cache.storage import ContentStore, MetadataUnavailable, StoreUnavailable
from proxy import config as configuration
from proxy import errors
from proxy.access.gate import Gate
from proxy.access.policy import ANYONE, Policy
from proxy.access.throttle import LoginThrottle
from proxy.access.tokens import Tokens, load_or_create_key
from proxy.access.users import Users
from proxy.fleet import peers
from proxy.hosted.opening import open_hosted
from proxy.hosted.repository import HostedRepositories
from proxy.http.edge import error_response
from proxy.http.push import Forwarder
from proxy.http.registry import routes
from proxy.images import pinning
from proxy.mirror import open_mirror
from proxy.ops import health, logs, metrics, observe, status
from proxy.record import record_of

if TYPE_CHECKING:  # redis-py and the fleet are loaded only with [coordination]
    from proxy.fleet import peer, replicas

log = structlog.get_logger("pullproxy")
TOUCH_INTERVAL = 2.0
CONFIG_ENV = "PULLPROXY_CONFIG"


async def _registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.RegistryError)
    record_of(request.scope).error = exc.message  # for the status page's recent errors
    return error_response(exc)


async def _download_failed(request: Request, exc: Exception) -> Response:
    """A download that failed before its response started (e.g. no room in the cache): 503, or 502 if too large."""
    assert isinstance(exc, flight.DownloadFailed)
    if isinstance(exc, flight.NoRoom) and exc.shortage is flight.Shortage.BLOB_TOO_LARGE:
        return await _registry_error(request, errors.bad_upstream(str(exc)))
    return await _registry_error(request, errors.unavailable(str(exc)))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    """The shared object store is unreachable ([storage] backend = "s3"): 503, retry later; nothing was lost."""
    return await _registry_error(request, errors.unavailable(f"the cache's object store is unavailable: {exc}"))


async def _metadata_unavailable(request: Request, exc: Exception) -> Response:
    """The fleet's Redis is away where no fallback exists (most paths have one): 503."""
    return await _registry_error(request, errors.unavailable(str(exc)))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(errors.unsupported(f"{request.method} is not supported on {request.url.path}"))
    return error_response(errors.NoSuchEndpoint(f"no such endpoint {request.url.path}"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", path=request.url.path)
    return error_response(errors.Internal("internal error"))


OPERATING = [
    Route("/", status.page, methods=["GET"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/metrics", metrics.endpoint, methods=["GET"]),
]


def create_app(
    config: configuration.Config, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
) -> Starlette:
    """The app for `config`; `transports` (by upstream name) serve in-process tests, see `open_mirror`."""
    activity = observe.Activity()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_mirror(config, transports) as (router, mirror):
            store = mirror.store
            app.state.router = router
            app.state.mirror = mirror
            app.state.activity = activity
            app.state.probe = health.CacheProbe(store.partial_dir)
            app.state.sampler = metrics.Sampler(store, mirror.downloads, config.max_size)
            replica = peers.this_replica(config) if config.coordination is not None else None
            hosted = await _open_hosted(config, store, replica)
            app.state.hosted = hosted
            forwarder = None
            if hosted is not None and replica is not None and config.coordination is not None:
                forwarder = Forwarder(config.coordination, replica)
            app.state.forwarder = forwarder
            app.state.sampler.hosted = hosted
            if hosted is not None:
                mirror.blobs.hosted_blob = hosted.content.find_blob  # a blob both pushed and mirrored is stored once
            app.state.gate = await _gate(config, hosted)
            # One identity for this process in the fleet: its leases, uploads and heartbeat name the same replica.
            app.state.peer_fleet = peer_fleet = _peer_fleet(config, replica)
            if peer_fleet is not None and peer_fleet.flight is not None:
                mirror.blobs.fleet = peer_fleet.flight.origin
            await to_thread.run_sync(_remove_stale_partials, store.partial_dir)
            metrics.worker_started()
            tasks = [asyncio.create_task(_flush_touches(store)), asyncio.create_task(app.state.sampler.run())]
            if config.pins and config.pin_refresh > 0:
                tasks.append(asyncio.create_task(pinning.keep_refreshed(config, router, mirror)))
            if hosted is not None:
                tasks.append(asyncio.create_task(_collect_garbage(hosted)))
            app.state.fleet = fleet = _fleet(config, mirror.meta, replica)
            if fleet is not None:
                tasks.append(asyncio.create_task(fleet.run()))
            log.info(
                "serving",
                cache=str(config.cache_dir),
                max_size=config.max_size,
                upstreams=[f"{u.name}={u.url}" for u in config.upstreams],
            )
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                if forwarder is not None:
                    await forwarder.aclose()
                if fleet is not None:
                    await fleet.leave()
                if hosted is not None:
                    await to_thread.run_sync(hosted.close)
                if peer_fleet is not None:
                    await peer_fleet.aclose()
                metrics.worker_stopped()

    return Starlette(
        routes=[*routes, *_peer_routes(config), *OPERATING],
        middleware=[Middleware(logs.AccessLog, listeners=[observe.Observe(activity)])],
        exception_handlers={
            errors.RegistryError: _registry_error,
            flight.DownloadFailed: _download_failed,
            StoreUnavailable: _store_unavailable,
            MetadataUnavailable: _metadata_unavailable,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )


async def _open_hosted(
    config: configuration.Config, store: ContentStore, replica: peers.Replica | None = None
) -> HostedRepositories | None:
    """`[hosted]`'s repositories (`proxy.hosted.opening`); None without `[hosted]` (the mirror stays read-only)."""
    return await to_thread.run_sync(open_hosted, config, store.find_blob, None if replica is None else replica.url)


def _peer_routes(config: configuration.Config) -> list[Route]:
    """The endpoint other replicas fetch in-flight downloads from; none without `[coordination]`."""
    if config.coordination is None:
        return []
    from proxy.fleet import peer

    return list(peer.routes)


def _peer_fleet(config: configuration.Config, replica: peers.Replica | None) -> peer.Fleet | None:
    """With `[coordination]`: leases and peer transfers, one upstream fetch per blob for the fleet."""
    if config.coordination is None:
        return None
    from proxy.fleet import peer

    return peer.open_fleet(config, replica)


def _fleet(
    config: configuration.Config, meta: object, replica: peers.Replica | None = None
) -> replicas.ReplicaRegistry | None:
    """With `[coordination]`: this replica's heartbeat, sharing the metadata's view of Redis.

    `replica`: this process's identity, when other parts (leases, uploads) hold one already,
    so the fleet knows it by one id.
    """
    if config.coordination is None:
        return None
    from cache.redis_meta import RedisMetadata
    from proxy.fleet import replicas

    client = replicas.connect(config.coordination.redis)
    replica = replica or peers.this_replica(config)
    if not isinstance(meta, RedisMetadata):
        return replicas.ReplicaRegistry(client, replica)

    async def write_pending() -> None:  # links learnt while Redis was away
        if meta.pending:
            with contextlib.suppress(MetadataUnavailable):  # away again: the next heartbeat retries
                await to_thread.run_sync(meta.write_pending)

    return replicas.ReplicaRegistry(client, replica, meta.health, write_pending)


async def _collect_garbage(hosted: HostedRepositories) -> None:
    """Every `upload_ttl` (at least a minute): drop expired uploads and blobs nothing references."""
    while True:
        await asyncio.sleep(max(hosted.config.upload_ttl, 60.0))
        try:
            collected = await to_thread.run_sync(hosted.collect)
            if collected.blobs or collected.unlinked or collected.uploads:
                log.info(
                    "hosted garbage collected",
                    unlinked=collected.unlinked,
                    blobs=collected.blobs,
                    bytes=collected.bytes,
                    uploads=collected.uploads,
                )
        except Exception:
            log.exception("hosted garbage collection failed")


async def _gate(config: configuration.Config, hosted: HostedRepositories | None = None) -> Gate:
    auth = config.auth or configuration.AuthConfig()
    users = Users(auth.users, auth.htpasswd, LoginThrottle())
    await users.load()
    key = auth.token_key
    if key is None:
        key = await to_thread.run_sync(load_or_create_key, config.cache_dir)
    policy = Policy(config.access, config.default_pull, ANYONE if config.auth is None else ())
    if hosted is None:
        return Gate(policy, users, Tokens(key, auth.token_ttl), config.trusted_proxies)
    return Gate(policy, users, Tokens(key, auth.token_ttl), config.trusted_proxies, hosted.names.matches)


def _remove_stale_partials(directory: Path) -> None:
    """Files of downloads a crash interrupted (those no worker holds the lock of: workers share the
    folder), and other staged files older than an hour. Age is the change time: a hard link just
    made (a hosted blob staged for the cache) keeps its file's old modification time."""
    import time

    removed = flight.remove_abandoned(directory)
    if removed:
        log.info("removed abandoned downloads", count=removed)
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            if not entry.name.endswith(flight.SUFFIXES) and entry.stat().st_ctime < time.time() - 3600:
                os.unlink(entry.path)


async def _flush_touches(store: ContentStore) -> None:
    while True:
        await asyncio.sleep(TOUCH_INTERVAL)
        try:
            await to_thread.run_sync(store.flush_touches)
        except Exception:
            log.exception("recording cache hits failed")


def app_from_environment() -> Starlette:
    """Factory for uvicorn's worker processes, which cannot be handed a config object."""
    path = os.environ.get(CONFIG_ENV)
    config = configuration.load(Path(path) if path else None)
    logs.configure(config.log_format)
    return create_app(config)
