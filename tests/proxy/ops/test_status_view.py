"""The status page's parts in-process: the metrics accessors, the view model builder, and
the template's rendering (escaping of everything a client or an upstream can name)."""

from __future__ import annotations

import dataclasses
import html
import re
from typing import Any

import markupsafe
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.mirror.outcome import Outcome
from proxy.ops import metrics, status
from proxy.ops.observe import Activity, Failure
from proxy.paths import Endpoint

NOW = 1_700_003_600.0
DIGEST = "sha256:" + "ab" * 32


def _snapshot() -> metrics.Snapshot:
    """A collection like a scrape's: the series as `proxy.ops.metrics` defines them."""
    registry = CollectorRegistry()
    Gauge("pullproxy_cache_size_bytes", "", registry=registry).set(3 << 20)
    Gauge("pullproxy_cache_limit_bytes", "", registry=registry).set(1 << 30)
    Gauge("pullproxy_cache_entries", "", registry=registry).set(12)
    Counter("pullproxy_cache_evictions", "", registry=registry).inc(2)
    cache = Counter("pullproxy_cache_requests", "", ["kind", "outcome"], registry=registry)
    for kind, outcome, count in [
        ("manifest", "hit", 3),
        ("blob", "hit", 4),
        ("manifest", "revalidated", 1),
        ("manifest", "stale", 1),
        ("blob", "joined", 2),
        ("blob", "miss", 9),
        ("tags", "hit", 100),  # not a manifest or blob: not in the hit ratio
    ]:
        cache.labels(kind, outcome).inc(count)
    Counter("pullproxy_cache_served_bytes", "", ["kind"], registry=registry).labels("blob").inc(5 << 20)
    fetched = Counter("pullproxy_upstream_fetched_bytes", "", ["upstream"], registry=registry)
    fetched.labels("docker.io").inc(2048)
    fetched.labels("ghcr.io").inc(1024)
    Gauge("pullproxy_downloads_in_flight", "", registry=registry).set(2)
    Gauge("pullproxy_download_clients", "", registry=registry).set(5)
    seconds = Histogram("pullproxy_upstream_request_duration_seconds", "", ["upstream"], registry=registry)
    for _ in range(4):
        seconds.labels("docker.io").observe(0.1)
    Counter("pullproxy_upstream_errors", "", ["upstream"], registry=registry).labels("docker.io").inc()
    return metrics.Snapshot(registry)


def _upstreams() -> list[dict[str, object]]:
    return [
        {
            "name": "docker.io",
            "url": "https://registry-1.docker.io",
            "state": "failing",
            "last_ok": NOW - 3000,
            "last_error": {"at": NOW - 60, "what": "GET blobs: 503"},
        },
        {"name": "ghcr.io", "url": "https://ghcr.io", "state": "unknown", "last_ok": None, "last_error": None},
    ]


def test_snapshot_accessors_read_the_series_the_metrics_define() -> None:
    before = metrics.Snapshot(metrics.REGISTRY)
    metrics.CACHE_REQUESTS.labels(Endpoint.BLOB, Outcome.JOINED).inc(3)
    metrics.CACHE_REQUESTS.labels(Endpoint.TAGS, Outcome.JOINED).inc(5)
    metrics.CACHE_SERVED_BYTES.labels(Endpoint.BLOB).inc(7)
    upstream = metrics.for_upstream("accessors.test")
    upstream.seconds.observe(0.5)
    upstream.errors.inc()
    upstream.fetched.inc(11)
    after = metrics.Snapshot(metrics.REGISTRY)

    assert after.cache_answers(Outcome.JOINED) - before.cache_answers(Outcome.JOINED) == 3
    assert after.served_bytes() - before.served_bytes() == 7
    assert after.fetched_bytes() - before.fetched_bytes() == 11
    assert (after.upstream_requests("accessors.test"), after.upstream_errors("accessors.test")) == (1, 1)
    assert after.fetched_bytes("accessors.test") == 11


def test_view_model_holds_cache_use_hit_ratio_traffic_and_upstreams() -> None:
    view = status.build(_snapshot(), _upstreams(), Activity(), NOW)

    assert view.cache == status.CacheUse("3.0 MiB", "1.0 GiB", 0.3, "<1%", "12", "2")
    assert view.hits.ratio == "45.0%"  # 3 + 4 hits, 1 revalidated, 1 stale of 20
    assert view.hits.answered == "20"
    assert [(item.outcome, item.count) for item in view.hits.breakdown] == [
        (Outcome.HIT, "7"),
        (Outcome.REVALIDATED, "1"),
        (Outcome.STALE, "1"),
        (Outcome.JOINED, "2"),
        (Outcome.MISS, "9"),
    ]
    assert view.traffic == status.Traffic(served="5.0 MiB", fetched="3.0 KiB", downloads="2", clients="5")
    docker, ghcr = view.upstreams
    assert docker == status.UpstreamRow(
        name="docker.io",
        url="https://registry-1.docker.io",
        state="failing",
        last_ok="50 min ago",
        last_error=status.LastError("60 s ago", status.Code("GET blobs: 503", "GET blobs: 503")),
        requests="4",
        errors="1",
        fetched="2.0 KiB",
    )
    assert (ghcr.last_ok, ghcr.last_error, ghcr.requests, ghcr.fetched) == ("never", None, "0", "1.0 KiB")
    assert view.server == ()


def test_view_model_says_none_yet_without_requests() -> None:
    view = status.build(metrics.Snapshot(CollectorRegistry()), [], Activity(), NOW)
    assert (view.hits.ratio, view.cache.used, view.cache.used_percent) == ("none yet", "0%", 0.0)
    assert (view.upstreams, view.pulls, view.errors) == ((), (), ())


def test_view_model_shows_only_what_the_caller_may_pull_and_bounds_the_lists() -> None:
    activity = Activity()
    for i in range(15):
        for _ in range(i + 1):
            activity.pulled(f"acme/app{i}:1")
    activity.pulled("private/db:1")
    for i in range(30):
        path = f"/v2/acme/app/manifests/{DIGEST}"
        activity.failed(Failure(NOW - 100 + i, "GET", path, 502, f"docker.io: bad digest {DIGEST}"))
    activity.failed(Failure(NOW, "GET", "/v2/private/db/manifests/1", 503, "hidden"))
    activity.failed(Failure(NOW, "GET", "/v2/", 500, "no repository: shown"))

    view = status.build(_snapshot(), [], activity, NOW, visible=lambda name: not name.startswith("private/"))

    assert [pull.image for pull in view.pulls] == [f"acme/app{i}:1" for i in range(14, 4, -1)]
    assert view.pulls[0].count == "15"
    assert len(view.errors) == status.ERRORS_SHOWN
    first, second = view.errors[:2]
    assert (first.status, first.why, first.ago) == (500, "no repository: shown", "0 s ago")
    assert second.request == status.Code(
        f"GET /v2/acme/app/manifests/{DIGEST}", "GET /v2/acme/app/manifests/sha256:abababababab…"
    )
    assert second.why == "docker.io: bad digest sha256:abababababab…"
    assert all("hidden" not in error.why for error in view.errors)


def test_view_model_says_whose_the_per_worker_parts_are_with_several_workers() -> None:
    activity = Activity()
    activity.since = NOW - 60
    single = status.build(metrics.Snapshot(CollectorRegistry()), [], activity, NOW)
    several = status.build(metrics.Snapshot(CollectorRegistry()), [], activity, NOW, worker=4242)
    assert single.note == "Pulls count tag lookups since 2023-11-14 23:12:20 UTC."
    assert "cover all workers" in several.note and "(pid 4242) since 2023-11-14 23:12:20 UTC" in several.note


HOSTILE = "<x-evil a='1'>\"&amp;"


def _hostile(value: Any) -> Any:
    """`value` with every string in it replaced by markup that must not come through."""
    if isinstance(value, str) and not isinstance(value, Outcome):
        return HOSTILE
    if isinstance(value, tuple):
        return tuple(_hostile(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _hostile(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value


def test_template_escapes_every_string_in_titles_headers_and_cells() -> None:
    activity = Activity()
    activity.pulled("acme/app:1")
    activity.failed(Failure(NOW, "GET", "/v2/acme/app/manifests/1", 502, "x"))
    view = status.build(_snapshot(), _upstreams(), activity, NOW)
    upstream = dataclasses.replace(view.upstreams[0], notes=("TLS not verified",))
    view = dataclasses.replace(
        view,
        upstreams=(upstream, *view.upstreams[1:]),
        server=(status.Fact("TLS", "on"), status.Fact("Certificate expires", "in 3 d", warning=True)),
        fleet=status.fleet_view(_fleet_state(problem="refused"), NOW),
    )

    page = status.render_view(_hostile(view))

    assert "<x-evil" not in page and "'1'>" not in page
    escaped = str(markupsafe.escape(HOSTILE))
    assert f'<code title="{escaped}">{escaped}</code>' in page  # hover title and cell of the failing request
    assert f"<th>{escaped}</th>" in page  # a server fact's row header
    shown = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert shown.count(HOSTILE) >= 20  # every string field came through, as text


def test_template_shows_server_facts_and_upstream_notes_only_when_there_are_some() -> None:
    view = status.build(_snapshot(), _upstreams(), Activity(), NOW)
    plain = status.render_view(view)
    assert 'id="server"' not in plain and "TLS" not in plain

    upstream = dataclasses.replace(view.upstreams[0], notes=("TLS not verified",))
    facts = (status.Fact("TLS", "off", warning=True),)
    page = status.render_view(dataclasses.replace(view, upstreams=(upstream,), server=facts))
    assert '<section id="tls"><h2>TLS</h2>' in page
    assert '<th>TLS</th><td><span class="state failing">off</span></td>' in page
    assert '<br><span class="state failing">TLS not verified</span>' in page


def test_template_lays_out_the_view_as_the_page_did() -> None:
    activity = Activity()
    activity.pulled("acme/app:1")
    page = status.render_view(status.build(_snapshot(), _upstreams(), activity, NOW))

    assert "<script" not in page and '<meta http-equiv="refresh" content="10">' in page
    assert '<div class="big" id="hit-ratio">45.0%</div>' in page
    assert '<div class="bar" role="img" aria-label="&lt;1% used"><div style="width:0.3%"></div></div>' in page
    assert "hit 7 · revalidated 1 · stale 1 · joined 2 · miss 9" in page
    assert '<th class="num">Requests</th>' in page and '<td class="num">4</td>' in page
    assert '<span class="state failing">failing</span>' in page
    assert '60 s ago: <code title="GET blobs: 503">GET blobs: 503</code>' in page
    assert '<tr><td><code>acme/app:1</code></td><td class="num">1</td></tr>' in page
    assert '<p class="sub">no errors</p>' in page


def _fleet_state(problem: str | None = None) -> dict[str, object]:
    """As `ReplicaRegistry.state()` answers it: two live replicas, this one second."""
    return {
        "redis": {"state": "failing" if problem else "ok", "problem": problem, "last_ok": NOW - 30, "last_error": None},
        "replica": "host-b-2-bbbb",
        "replicas": [
            {"id": "host-a-1-aaaa", "url": "http://10.0.0.5:5000", "started": NOW - 600, "last_seen": NOW - 2},
            {"id": "host-b-2-bbbb", "url": "http://10.0.0.6:5000", "started": NOW - 60, "last_seen": NOW - 1},
        ],
    }


def test_fleet_section_shows_redis_and_the_live_replicas_only_with_coordination() -> None:
    view = status.build(_snapshot(), _upstreams(), Activity(), NOW)
    assert 'id="fleet"' not in status.render_view(view)

    fleet = status.fleet_view(_fleet_state(), NOW)
    assert fleet.redis == "ok" and fleet.problem is None and fleet.last_ok == "30 s ago"
    assert [(r.id, r.started, r.last_seen, r.this) for r in fleet.replicas] == [
        ("host-a-1-aaaa", "10 min ago", "2 s ago", False),
        ("host-b-2-bbbb", "60 s ago", "1 s ago", True),
    ]
    page = status.render_view(dataclasses.replace(view, fleet=fleet))
    assert '<section id="fleet"><h2>Fleet</h2>' in page
    assert 'Redis <span class="state ok">ok</span> · last answered 30 s ago' in page
    assert "degraded" not in page
    assert '<code>host-b-2-bbbb</code> <span class="sub">(this one)</span>' in page
    assert '<code class="nowrap">http://10.0.0.5:5000</code>' in page

    down = status.fleet_view(_fleet_state(problem="ConnectionError: refused"), NOW)
    page = status.render_view(dataclasses.replace(view, fleet=down))
    assert '<span class="state failing">failing</span>' in page
    assert '<span class="state failing">degraded</span> ConnectionError: refused: tags are asked upstream' in page


def test_fleet_section_says_who_fetched_peer_transfers_lease_waits_and_object_store_latency() -> None:
    registry = CollectorRegistry()
    fetches = Counter("pullproxy_fleet_fetches", "", ["by"], registry=registry)
    fetches.labels("self").inc(3)
    fetches.labels("peer").inc(5)
    Counter("pullproxy_fleet_peer_received_bytes", "", registry=registry).inc(2 << 20)
    served = Counter("pullproxy_fleet_peer_served", "", ["source"], registry=registry)
    served.labels("download").inc(4)
    served.labels("cache").inc(1)
    served.labels("none").inc(7)  # it had neither: nothing served
    Counter("pullproxy_fleet_lease_waits", "", registry=registry).inc(2)
    latency = Histogram("pullproxy_object_store_request_duration_seconds", "", ["operation"], registry=registry)
    latency.labels("get").observe(0.010)
    latency.labels("put").observe(0.030)
    Counter("pullproxy_object_store_errors", "", ["operation"], registry=registry).labels("get").inc()
    traffic = status.fleet_traffic(metrics.Snapshot(registry))
    assert traffic == (
        "cold blobs: 3 fetched from the upstream for the fleet, 5 followed from a peer (2.0 MiB), 0 fetched alone"
        " · 5 served to peers · 2 lease waits · object store: 2 requests, 20 ms on average, 1 failed"
    )
    view = status.build(_snapshot(), _upstreams(), Activity(), NOW)
    fleet = dataclasses.replace(status.fleet_view(_fleet_state(), NOW), traffic=traffic)
    assert f'<p class="sub">This replica: {traffic}</p>' in status.render_view(dataclasses.replace(view, fleet=fleet))
