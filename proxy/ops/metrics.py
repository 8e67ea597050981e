"""Prometheus metrics: their definitions, `/metrics`, and the multiprocess mode of `--workers N`.

prometheus-client decides when it is imported whether values live in memory or in
per-process files under PROMETHEUS_MULTIPROC_DIR. `pullproxy serve --workers N` sets
that variable before it starts the workers, so each writes its own files and whichever
answers a scrape reports the sum of all. Gauges that describe a process (downloads in
flight) are summed over live workers; gauges that describe the shared cache take the
value set last.

The request path only increments counters (`proxy.observe`, `proxy.upstream`); what
needs a lookup is sampled by `Sampler` every few seconds and before each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from anyio import to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response

from cache.flight import Downloads
from cache.storage import ContentStore, Operation
from proxy.paths import Endpoint

if TYPE_CHECKING:  # at run time the import would cycle back here through the upstream client
    from proxy.hosted.repository import HostedRepositories
    from proxy.mirror.outcome import Outcome

log = structlog.get_logger("pullproxy")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROCESS = MULTIPROC_ENV in os.environ  # read by prometheus-client when imported, too
SAMPLE_INTERVAL = 5.0

disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the output, no dashboard reads them
REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "pullproxy_requests",
    "Requests answered, by route (manifest, blob, tags, referrers, catalog, base, token, other) and status.",
    ["route", "status"],
    registry=REGISTRY,
)
CACHE_REQUESTS = Counter(
    "pullproxy_cache_requests",
    "Cache outcome of registry requests: hit, miss, joined (a download in flight), revalidated, stale.",
    ["kind", "outcome"],
    registry=REGISTRY,
)
CACHE_SERVED_BYTES = Counter(
    "pullproxy_cache_served_bytes",
    "Bytes sent to clients from the cache (outcome hit, revalidated or stale).",
    ["kind"],
    registry=REGISTRY,
)
CACHE_SIZE = Gauge(
    "pullproxy_cache_size_bytes",
    "Disk used by the cache, as max_size counts it.",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
CACHE_LIMIT = Gauge(
    "pullproxy_cache_limit_bytes", "The cache's max_size.", multiprocess_mode="mostrecent", registry=REGISTRY
)
CACHE_ENTRIES = Gauge(
    "pullproxy_cache_entries", "Blobs and manifests in the cache.", multiprocess_mode="mostrecent", registry=REGISTRY
)
EVICTIONS = Counter("pullproxy_cache_evictions", "Entries evicted to keep the cache under max_size.", registry=REGISTRY)
DOWNLOADS = Gauge(
    "pullproxy_downloads_in_flight",
    "Blob downloads from upstreams in progress.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
DOWNLOAD_CLIENTS = Gauge(
    "pullproxy_download_clients",
    "Clients receiving a blob from a download in flight (waiting on the upstream).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "pullproxy_upstream_request_duration_seconds",
    "Time until an upstream answered a request (response headers; token requests included).",
    ["upstream"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "pullproxy_upstream_errors",
    "Upstream requests that failed: unreachable, timed out, broken off, 5xx or 429.",
    ["upstream"],
    registry=REGISTRY,
)
UPSTREAM_BYTES = Counter(
    "pullproxy_upstream_fetched_bytes", "Body bytes received from an upstream.", ["upstream"], registry=REGISTRY
)
REDIS_UP = Gauge(
    "pullproxy_redis_up",
    "With [coordination]: 1 when the last heartbeat reached the fleet's Redis, 0 when it did not.",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
FLEET_REPLICAS = Gauge(
    "pullproxy_fleet_replicas",
    "With [coordination]: replicas whose heartbeat is live, as of the last one that reached Redis.",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
HOSTED_BYTES = Gauge(
    "pullproxy_hosted_bytes",
    "Disk used by hosted repositories as [hosted] max_size counts it (blobs once, manifests, uploads in progress).",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
HOSTED_REPOSITORIES = Gauge(
    "pullproxy_hosted_repositories", "Hosted repositories.", multiprocess_mode="mostrecent", registry=REGISTRY
)
HOSTED_MANIFESTS = Gauge(
    "pullproxy_hosted_manifests",
    "Manifests in all hosted repositories.",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
HOSTED_QUOTA_USE = Gauge(
    "pullproxy_hosted_quota_use",
    "Use of each [hosted] quota (max_size, max_repositories, max_manifests_per_repository: the fullest repository).",
    ["quota"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
HOSTED_QUOTA_LIMIT = Gauge(
    "pullproxy_hosted_quota_limit",
    "Each [hosted] quota's limit.",
    ["quota"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
HOSTED_PUSHES = Counter(
    "pullproxy_hosted_pushes",
    "Pushes to hosted repositories that landed, by kind: blob (uploaded or mounted) or manifest.",
    ["kind"],
    registry=REGISTRY,
)


OBJECT_STORE_SECONDS = Histogram(
    "pullproxy_object_store_request_duration_seconds",
    'Time object store requests took ([storage] backend = "s3"), by operation: head, get (until the answer'
    " started), put (the whole upload), delete, list.",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
OBJECT_STORE_ERRORS = Counter(
    "pullproxy_object_store_errors",
    "Object store requests that failed (unreachable, refused), by operation.",
    ["operation"],
    registry=REGISTRY,
)
FLEET_FETCHES = Counter(
    "pullproxy_fleet_fetches",
    "Cold blob downloads of a replica in a fleet, by where the bytes came from: self (it held the lease and"
    " fetched from the upstream), peer (the lease holder's download), alone (no lease: Redis unreachable, no"
    " holder reachable in time, or peer requests refused).",
    ["by"],
    registry=REGISTRY,
)
FLEET_PEER_BYTES = Counter(
    "pullproxy_fleet_peer_received_bytes", "Blob bytes received from other replicas' downloads.", registry=REGISTRY
)
FLEET_PEER_SERVED = Counter(
    "pullproxy_fleet_peer_served",
    "Peer blob requests this replica answered, by source: download (in flight), cache, none (it had neither).",
    ["source"],
    registry=REGISTRY,
)
FLEET_LEASE_WAITS = Counter(
    "pullproxy_fleet_lease_waits",
    "Downloads that waited for a blob's lease to be released or to expire (its holder unreachable or done).",
    registry=REGISTRY,
)


def object_store_request(operation: Operation, seconds: float, failed: bool) -> None:
    """A `BucketContentStore` request done (its `observe` hook)."""
    OBJECT_STORE_SECONDS.labels(operation.value).observe(seconds)
    if failed:
        OBJECT_STORE_ERRORS.labels(operation.value).inc()


class FetchedBy(StrEnum):
    """Where the bytes of a fleet replica's cold blob download come from."""

    SELF = "self"
    PEER = "peer"
    ALONE = "alone"


class PeerSource(StrEnum):
    """What a replica answered a peer's blob request from."""

    DOWNLOAD = "download"
    CACHE = "cache"
    NONE = "none"


class PushKind(StrEnum):
    BLOB = "blob"
    MANIFEST = "manifest"


def pushed(kind: PushKind) -> None:
    HOSTED_PUSHES.labels(kind).inc()


_TLS_EXPIRY: list[Gauge] = []  # made on first use: without TLS the metric is absent, not 0


def tls_certificate_expiry(not_after: float) -> None:
    """When the certificate the listener presents expires (Unix time), for expiry alerts."""
    if not _TLS_EXPIRY:
        _TLS_EXPIRY.append(
            Gauge(
                "pullproxy_tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate the mirror presents expires (Unix time).",
                multiprocess_mode="mostrecent",
                registry=REGISTRY,
            )
        )
    _TLS_EXPIRY[0].set(not_after)


class Children:
    """A metric's series by label values, remembered: `labels()` costs more than the increment.

    Only for labels of bounded cardinality (route, status, outcome).
    """

    def __init__(self, metric: Counter) -> None:
        self._metric = metric
        self._children: dict[tuple[object, ...], Counter] = {}

    def __call__(self, *values: object) -> Counter:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


@dataclass(frozen=True, slots=True)
class UpstreamMetrics:
    """One upstream's series, bound once so its requests skip the label lookup."""

    seconds: Histogram
    errors: Counter
    fetched: Counter


def for_upstream(name: str) -> UpstreamMetrics:
    return UpstreamMetrics(UPSTREAM_SECONDS.labels(name), UPSTREAM_ERRORS.labels(name), UPSTREAM_BYTES.labels(name))


class Sampler:
    """Sets the gauges and the eviction counter from the cache's own bookkeeping."""

    def __init__(self, store: ContentStore, downloads: Downloads, max_size: int) -> None:
        self.store = store
        self.downloads = downloads
        self.hosted: HostedRepositories | None = None  # set once opened: its gauges are sampled too
        self._evictions = 0
        CACHE_LIMIT.set(max_size)

    async def sample(self) -> None:
        # Up to the first await this runs alone on the event loop: no eviction is counted twice.
        DOWNLOADS.set(self.downloads.fetching())
        DOWNLOAD_CLIENTS.set(self.downloads.readers())
        evictions = self.store.evictions
        if evictions > self._evictions:
            EVICTIONS.inc(evictions - self._evictions)
            self._evictions = evictions
        size, entries = await to_thread.run_sync(lambda: (self.store.volume(), self.store.count()))
        CACHE_SIZE.set(size)
        CACHE_ENTRIES.set(entries)
        if self.hosted is not None:
            await to_thread.run_sync(_sample_hosted, self.hosted)

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:
                log.exception("sampling metrics failed")
            await asyncio.sleep(SAMPLE_INTERVAL)


def _sample_hosted(hosted: HostedRepositories) -> None:
    usage = hosted.usage()
    HOSTED_BYTES.set(usage.bytes)
    HOSTED_REPOSITORIES.set(len(usage.repositories))
    HOSTED_MANIFESTS.set(usage.manifests)
    limits = hosted.quota_limits()
    for quota, use in usage.quota_use().items():
        HOSTED_QUOTA_USE.labels(quota).set(use)
        HOSTED_QUOTA_LIMIT.labels(quota).set(limits[quota])


def collected() -> CollectorRegistry:
    """What a scrape reports: this process's registry, or every worker's files combined."""
    if not MULTIPROCESS:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


class Snapshot:
    """Every sample of one collection, summed by name and labels (for the status page).

    Readers use the typed accessors below, so the series names stay beside their definitions.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._samples = [sample for family in registry.collect() for sample in family.samples]

    def total(self, name: str, **labels: str) -> float:
        return sum(
            sample.value
            for sample in self._samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
        )

    def _count(self, name: str, **labels: str) -> int:
        return int(self.total(name, **labels))

    def cache_size(self) -> int:
        return self._count("pullproxy_cache_size_bytes")

    def cache_limit(self) -> int:
        return self._count("pullproxy_cache_limit_bytes")

    def cache_entries(self) -> int:
        return self._count("pullproxy_cache_entries")

    def evictions(self) -> int:
        return self._count("pullproxy_cache_evictions_total")

    def cache_answers(self, outcome: Outcome, kinds: Iterable[Endpoint] = (Endpoint.MANIFEST, Endpoint.BLOB)) -> int:
        """Requests of those kinds that the cache answered with `outcome`."""
        return sum(self._count("pullproxy_cache_requests_total", kind=kind, outcome=outcome) for kind in kinds)

    def served_bytes(self) -> int:
        """Sent to clients from the cache, all kinds."""
        return self._count("pullproxy_cache_served_bytes_total")

    def fetched_bytes(self, upstream: str | None = None) -> int:
        """Received from one upstream, or from all."""
        labels = {} if upstream is None else {"upstream": upstream}
        return self._count("pullproxy_upstream_fetched_bytes_total", **labels)

    def downloads_in_flight(self) -> int:
        return self._count("pullproxy_downloads_in_flight")

    def download_clients(self) -> int:
        return self._count("pullproxy_download_clients")

    def upstream_requests(self, upstream: str) -> int:
        return self._count("pullproxy_upstream_request_duration_seconds_count", upstream=upstream)

    def upstream_errors(self, upstream: str) -> int:
        return self._count("pullproxy_upstream_errors_total", upstream=upstream)

    def fleet_fetches(self, by: FetchedBy) -> int:
        return self._count("pullproxy_fleet_fetches_total", by=by)

    def peer_received_bytes(self) -> int:
        return self._count("pullproxy_fleet_peer_received_bytes_total")

    def peer_served(self) -> int:
        """Peer blob requests answered with bytes (from a download in flight or the cache)."""
        served = (PeerSource.DOWNLOAD, PeerSource.CACHE)
        return sum(self._count("pullproxy_fleet_peer_served_total", source=source) for source in served)

    def lease_waits(self) -> int:
        return self._count("pullproxy_fleet_lease_waits_total")

    def object_store(self) -> tuple[int, float, int]:
        """(requests, their seconds in all, failures) of the object store."""
        requests = self._count("pullproxy_object_store_request_duration_seconds_count")
        return (
            requests,
            self.total("pullproxy_object_store_request_duration_seconds_sum"),
            self._count("pullproxy_object_store_errors_total"),
        )

    def hosted_quota(self, quota: str) -> tuple[int, int]:
        """(use, limit) of a `[hosted]` quota; (0, 0) without hosted repositories."""
        return self._count("pullproxy_hosted_quota_use", quota=quota), self._count(
            "pullproxy_hosted_quota_limit", quota=quota
        )

    def hosted_pushes(self, kind: PushKind) -> int:
        return self._count("pullproxy_hosted_pushes_total", kind=kind)


async def endpoint(request: Request) -> Response:
    await request.app.state.sampler.sample()
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await to_thread.run_sync(lambda: encode(collected()))
    return Response(body, headers={"Content-Type": content_type})


# -- several workers ------------------------------------------------------------------


@contextlib.contextmanager
def shared_by_workers() -> Iterator[Path]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the workers about to start, removed once they stopped."""
    directory = Path(tempfile.mkdtemp(prefix="pullproxy-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def worker_started() -> None:
    """Drop the live gauges of workers that died: uvicorn replaces them under new pids."""
    if not MULTIPROCESS:
        return
    directory = os.environ[MULTIPROC_ENV]
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def worker_stopped() -> None:
    if MULTIPROCESS:
        mark_process_dead(os.getpid(), os.environ[MULTIPROC_ENV])  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        pass
    return True
