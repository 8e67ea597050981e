"""The status page at `/`: how the mirror is doing, for a person, in plain HTML.

Cache use, hit ratio and traffic come from the metrics, so with several workers they
cover all of them; upstream state, most pulled images and recent errors are the
answering worker's own. The page refreshes itself; it needs no JavaScript.

`build` turns what the process knows into a `StatusView` of display-ready values (pure,
so tests build one without a server); `templates/status.html` lays it out, with Jinja's
autoescape, so no repository name, error message or upstream URL can inject markup.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response

from proxy import tls
from proxy.access.gate import Gate
from proxy.errors import RegistryError
from proxy.hosted.repository import HostedRepositories, Quota, Usage
from proxy.mirror.outcome import Outcome
from proxy.ops import metrics
from proxy.ops.health import upstream_state
from proxy.ops.observe import Activity
from proxy.paths import classify
from proxy.routing import Router, route_name
from proxy.units import format_ago, format_size

if TYPE_CHECKING:  # redis-py: loaded only with [coordination]
    from proxy.fleet.replicas import ReplicaRegistry

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

REFRESH_SECONDS = 10
TEMPLATE = "status.html"
OUTCOMES = (Outcome.HIT, Outcome.REVALIDATED, Outcome.STALE, Outcome.JOINED, Outcome.MISS)  # in display order
PULLS_SHOWN = 10
HOSTED_SHOWN = 50  # repositories listed; the rest are counted
ERRORS_SHOWN = 20
_DIGEST = re.compile(r"\b(sha256:[0-9a-f]{12})[0-9a-f]{52}\b")


@functools.cache
def templates() -> Jinja2Templates:
    """Made on first use: jinja2 (a few MiB of memory) is loaded once someone looks at the page, not before."""
    import jinja2
    from starlette.templating import Jinja2Templates

    return Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.PackageLoader("proxy.ops", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,  # a misspelt field fails the render instead of showing nothing
            trim_blocks=True,
            lstrip_blocks=True,
        )
    )


# -- the view model: display-ready values, escaped only by the template ----------------


@dataclass(frozen=True, slots=True)
class Code:
    """Text shown in monospace with digests shortened; the full text shows on hover."""

    full: str
    shown: str

    @classmethod
    def of(cls, text: str) -> Code:
        return cls(text, _short(text))


@dataclass(frozen=True, slots=True)
class CacheUse:
    size: str
    limit: str
    used_percent: float  # 0 to 100, the bar's width
    used: str  # the same for reading: "<1%" when some but less than one
    entries: str
    evicted: str


@dataclass(frozen=True, slots=True)
class OutcomeCount:
    outcome: Outcome
    count: str


@dataclass(frozen=True, slots=True)
class HitRatio:
    ratio: str  # "none yet" before the first manifest or blob request
    answered: str
    breakdown: tuple[OutcomeCount, ...]  # in `OUTCOMES` order


@dataclass(frozen=True, slots=True)
class Traffic:
    served: str
    fetched: str
    downloads: str
    clients: str


@dataclass(frozen=True, slots=True)
class LastError:
    ago: str
    what: Code


@dataclass(frozen=True, slots=True)
class UpstreamRow:
    name: str
    url: str
    state: str  # ok, failing or unknown: also its badge's CSS class
    last_ok: str
    last_error: LastError | None
    requests: str
    errors: str
    fetched: str
    backoff: str | None = None  # while the mirror does not ask it: when it tries again
    notes: tuple[str, ...] = ()  # extra lines under the URL, e.g. a warning that TLS is not verified


@dataclass(frozen=True, slots=True)
class Pull:
    image: str
    count: str


@dataclass(frozen=True, slots=True)
class ErrorRow:
    clock: str
    ago: str
    status: int
    request: Code
    why: str


@dataclass(frozen=True, slots=True)
class Fact:
    """One row about the server itself, e.g. TLS on or off, or when its certificate expires."""

    label: str
    value: str
    warning: bool = False  # shown as a red badge


@dataclass(frozen=True, slots=True)
class QuotaBar:
    quota: str  # the `[hosted]` key
    use: str
    limit: str
    used_percent: float  # 0 to 100, the bar's width
    used: str


@dataclass(frozen=True, slots=True)
class HostedRepository:
    name: str
    size: str
    tags: str
    manifests: str


@dataclass(frozen=True, slots=True)
class HostedView:
    quotas: tuple[QuotaBar, ...]
    repositories: tuple[HostedRepository, ...]  # those the caller may pull, up to HOSTED_SHOWN
    more: int  # visible repositories not listed


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    id: str
    url: str
    started: str  # "5 min ago"
    last_seen: str
    this: bool  # the replica that answered the page


@dataclass(frozen=True, slots=True)
class FleetView:
    """`[coordination]`: the fleet's Redis as this replica sees it, and the live replicas."""

    redis: str  # ok, failing or unknown: also its badge's CSS class
    problem: str | None  # why Redis is taken as unreachable, and what that means
    last_ok: str
    replicas: tuple[ReplicaRow, ...]  # as of this replica's last heartbeat
    traffic: str = ""  # this replica's share: who fetched its cold blobs, peer transfers, the object store


@dataclass(frozen=True, slots=True)
class StatusView:
    clock: str
    refresh_seconds: int
    cache: CacheUse
    hits: HitRatio
    traffic: Traffic
    upstreams: tuple[UpstreamRow, ...]
    pulls: tuple[Pull, ...]  # "no pulls yet" when empty
    errors: tuple[ErrorRow, ...]  # "no errors" when empty
    note: str
    server: tuple[Fact, ...] = ()  # a "Server" section, shown only when there are facts
    hosted: HostedView | None = None  # a "Hosted repositories" section, with [hosted] only
    fleet: FleetView | None = None  # a "Fleet" section, with [coordination] only


# -- the page -----------------------------------------------------------------------------


async def page(request: Request) -> Response:
    state = request.app.state
    await state.sampler.sample()
    snapshot = await to_thread.run_sync(lambda: metrics.Snapshot(metrics.collected()))
    upstreams = [upstream_state(upstream) for upstream in state.mirror.upstreams]
    visible = await _visibility(request)
    view = build(snapshot, upstreams, state.activity, time.time(), visible, _worker(), tls.describe_server())
    repositories: HostedRepositories | None = getattr(state, "hosted", None)
    if repositories is not None:
        usage = await to_thread.run_sync(repositories.usage)
        shown = hosted_view(usage, repositories.quota_limits(), await _hosted_visibility(request))
        view = dataclasses.replace(view, hosted=shown)
    fleet: ReplicaRegistry | None = getattr(state, "fleet", None)
    if fleet is not None:
        shown_fleet = dataclasses.replace(fleet_view(fleet.state(), time.time()), traffic=fleet_traffic(snapshot))
        view = dataclasses.replace(view, fleet=shown_fleet)
    return templates().TemplateResponse(request, TEMPLATE, {"view": view}, headers={"Cache-Control": "no-store"})


async def _visibility(request: Request) -> Callable[[str], bool]:
    """Which repositories (as clients name them) this caller may see: those it may pull.

    The page is open to anyone, so with access rules a private repository's name must not
    show in the most pulled images or in recent errors, as in `_catalog`.
    """
    gate: Gate = request.app.state.gate
    router: Router = request.app.state.router
    caller = await gate.caller(request)
    address = gate.address(request)

    def visible(name: str) -> bool:
        first, _, rest = name.partition("/")
        for path, ns in ((name, None), (rest, first)):  # a prefix, or containerd's ns in front
            try:
                route = router.route(path, ns)
            except RegistryError:
                continue
            return gate.policy.allows(route_name(route), caller.user, address)
        return False

    return visible


async def _hosted_visibility(request: Request) -> Callable[[str], bool]:
    """Which hosted repositories this caller may see: those it may pull, as `_catalog` lists them."""
    gate: Gate = request.app.state.gate
    caller = await gate.caller(request)
    address = gate.address(request)
    return lambda name: gate.policy.allows(name, caller.user, address)


def hosted_view(usage: Usage, limits: Mapping[Quota, int], visible: Callable[[str], bool]) -> HostedView:
    """Quota bars (totals: they name no repository) and the repositories the caller may see."""
    quotas = []
    for quota, use in usage.quota_use().items():
        limit = limits[quota]
        shown = format_size if quota is Quota.SIZE else _count
        percent = _percent(use, limit)
        quotas.append(QuotaBar(str(quota), shown(use), shown(limit), round(percent, 1), _percent_text(percent)))
    seen = [repo for repo in usage.repositories if visible(repo.name)]
    listed = tuple(
        HostedRepository(repo.name, format_size(repo.bytes), _count(repo.tags), _count(repo.manifests))
        for repo in seen[:HOSTED_SHOWN]
    )
    return HostedView(tuple(quotas), listed, max(0, len(seen) - HOSTED_SHOWN))


def fleet_view(state: Mapping[str, object], now: float) -> FleetView:
    """From `ReplicaRegistry.state()`, as `/readyz` shows it."""
    redis = state["redis"]
    assert isinstance(redis, Mapping)
    problem = redis["problem"]
    listed = state["replicas"]
    assert isinstance(listed, list)
    rows = tuple(
        ReplicaRow(
            id=str(replica["id"]),
            url=str(replica["url"]),
            started=format_ago(replica["started"], now),
            last_seen=format_ago(replica["last_seen"], now),
            this=replica["id"] == state["replica"],
        )
        for replica in listed
    )
    return FleetView(
        redis=str(redis["state"]),
        problem=f"{problem}: tags are asked upstream, links confirmed upstream" if problem else None,
        last_ok=format_ago(redis["last_ok"], now),
        replicas=rows,
    )


def fleet_traffic(snapshot: metrics.Snapshot) -> str:
    """One line on what this replica did for the fleet since it started."""
    self_, peer, alone = (snapshot.fleet_fetches(by) for by in metrics.FetchedBy)
    parts = [
        f"cold blobs: {_count(self_)} fetched from the upstream for the fleet, {_count(peer)} followed from"
        f" a peer ({format_size(snapshot.peer_received_bytes())}), {_count(alone)} fetched alone",
        f"{_count(snapshot.peer_served())} served to peers",
        f"{_count(snapshot.lease_waits())} lease waits",
    ]
    requests, seconds, failures = snapshot.object_store()
    if requests:
        parts.append(
            f"object store: {_count(requests)} requests, {1000 * seconds / requests:.0f} ms on average,"
            f" {_count(failures)} failed"
        )
    return " · ".join(parts)


def _percent(use: int, limit: int) -> float:
    return min(100.0, 100 * use / limit) if limit else 0.0


def _percent_text(percent: float) -> str:
    return "<1%" if 0 < percent < 1 else f"{percent:.0f}%"


def _worker() -> int | None:
    """This process's pid when the metrics cover several workers (the page then says whose the rest is)."""
    return os.getpid() if metrics.MULTIPROCESS else None


def render(
    snapshot: metrics.Snapshot,
    upstreams: Sequence[Mapping[str, object]],
    activity: Activity,
    now: float,
    visible: Callable[[str], bool] = lambda name: True,
) -> str:
    """The page as `page` serves it, without a request."""
    return render_view(build(snapshot, upstreams, activity, now, visible, _worker()))


def render_view(view: StatusView) -> str:
    return templates().get_template(TEMPLATE).render(view=view)


def build(
    snapshot: metrics.Snapshot,
    upstreams: Sequence[Mapping[str, object]],
    activity: Activity,
    now: float,
    visible: Callable[[str], bool] = lambda name: True,
    worker: int | None = None,
    server_tls: Mapping[str, object] | None = None,
) -> StatusView:
    """The page's content, from the metrics, the upstreams' state (`health.upstream_state`)
    and this process's activity; `visible` says which repository names the caller may see."""
    return StatusView(
        clock=_clock(now),
        refresh_seconds=REFRESH_SECONDS,
        cache=_cache_use(snapshot),
        hits=_hit_ratio(snapshot),
        traffic=Traffic(
            served=format_size(snapshot.served_bytes()),
            fetched=format_size(snapshot.fetched_bytes()),
            downloads=_count(snapshot.downloads_in_flight()),
            clients=_count(snapshot.download_clients()),
        ),
        upstreams=tuple(_upstream(snapshot, upstream, now) for upstream in upstreams),
        pulls=_pulls(activity, visible),
        errors=_errors(activity, now, visible),
        note=_scope_note(activity, worker),
        server=_tls_facts(server_tls, now) if server_tls is not None else (),
    )


def _tls_facts(server: Mapping[str, object], now: float) -> tuple[Fact, ...]:
    """Whether clients' credentials cross the network encrypted, and until when the certificate holds."""
    if not server.get("enabled"):
        why = "passwords and tokens cross the network in clear; tls_cert and tls_key in [server] turn HTTPS on"
        return (Fact("Listener", f"plain HTTP: {why}", warning=True),)
    certificate = server["certificate"]
    assert isinstance(certificate, Mapping)
    not_after = float(certificate["not_after"])
    days = (not_after - now) / 86400
    left = "expired" if days < 0 else f"in {days:.0f} d" if days >= 2 else f"in {max(0, int(days * 24))} h"
    clients = " · client certificates required" if server.get("client_certificates") == "required" else ""
    facts = [
        Fact("Listener", f"HTTPS {certificate['subject']} · issued by {certificate['issuer']}{clients}"),
        Fact(
            "Certificate",
            f"Certificate expires {_clock(not_after)} UTC ({left}) · SHA-256 {str(certificate['sha256'])[:16]}…",
            warning=days < tls.EXPIRY_WARNING_DAYS,
        ),
    ]
    error = server.get("rotation_error")
    if isinstance(error, Mapping):
        why = f"rotation failed {format_ago(error['at'], now)}: {error['why']}; the certificate above is still served"
        facts.append(Fact("Rotation", why, warning=True))
    return tuple(facts)


def _cache_use(snapshot: metrics.Snapshot) -> CacheUse:
    size, limit = snapshot.cache_size(), snapshot.cache_limit()
    used = min(100.0, 100 * size / limit) if limit else 0.0
    return CacheUse(
        size=format_size(size),
        limit=format_size(limit),
        used_percent=round(used, 1),
        used="<1%" if 0 < used < 1 else f"{used:.0f}%",
        entries=_count(snapshot.cache_entries()),
        evicted=_count(snapshot.evictions()),
    )


def _hit_ratio(snapshot: metrics.Snapshot) -> HitRatio:
    counts = {outcome: snapshot.cache_answers(outcome) for outcome in OUTCOMES}
    answered = sum(counts.values())
    from_cache = sum(count for outcome, count in counts.items() if outcome.from_cache)
    return HitRatio(
        ratio=f"{100 * from_cache / answered:.1f}%" if answered else "none yet",
        answered=_count(answered),
        breakdown=tuple(OutcomeCount(outcome, _count(count)) for outcome, count in counts.items()),
    )


def _upstream(snapshot: metrics.Snapshot, upstream: Mapping[str, object], now: float) -> UpstreamRow:
    name = str(upstream["name"])
    error = upstream["last_error"]
    return UpstreamRow(
        name=name,
        url=str(upstream["url"]),
        state=str(upstream["state"]),
        last_ok=format_ago(upstream["last_ok"], now),
        last_error=LastError(format_ago(error["at"], now), Code.of(str(error["what"])))
        if isinstance(error, dict)
        else None,
        requests=_count(snapshot.upstream_requests(name)),
        errors=_count(snapshot.upstream_errors(name)),
        fetched=format_size(snapshot.fetched_bytes(name)),
        backoff=_backoff(upstream.get("backoff_until"), now),
        notes=("TLS not verified",) if upstream.get("tls") == tls.UpstreamTrust.NOT_VERIFIED else (),
    )


def _backoff(until: object, now: float) -> str | None:
    if not isinstance(until, int | float):
        return None
    return f"not asked, next try in {max(0, round(until - now))} s"


def _pulls(activity: Activity, visible: Callable[[str], bool]) -> tuple[Pull, ...]:
    pulled = [(image, count) for image, count in activity.most_pulled(50) if visible(image.rpartition(":")[0])]
    return tuple(Pull(image, _count(count)) for image, count in pulled[:PULLS_SHOWN])


def _errors(activity: Activity, now: float, visible: Callable[[str], bool]) -> tuple[ErrorRow, ...]:
    names = ((failure, classify(failure.path).name) for failure in activity.errors)
    shown = [failure for failure, name in names if not name or visible(name)]
    return tuple(
        ErrorRow(
            clock=_clock(failure.at),
            ago=format_ago(failure.at, now),
            status=failure.status,
            request=Code.of(f"{failure.method} {failure.path}"),
            why=_short(failure.message),
        )
        for failure in shown[:ERRORS_SHOWN]
    )


def _scope_note(activity: Activity, worker: int | None) -> str:
    since = f"since {_clock(activity.since)} UTC"
    if worker is None:
        return f"Pulls count tag lookups {since}."
    return (
        "Cache, hit ratio, traffic and upstream counts cover all workers. Upstream state, most pulled images "
        f"and recent errors are this worker's (pid {worker}) {since}; pulls count tag lookups."
    )


def _short(text: str) -> str:
    """Digests cut to their first 12 hex digits, for reading."""
    return _DIGEST.sub(r"\1…", text)


def _count(value: float) -> str:
    return f"{int(value):,}"


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")
