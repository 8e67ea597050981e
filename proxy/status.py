"""The status page at `/`: how the mirror is doing, for a person, in plain HTML.

Cache use, hit ratio and traffic come from the metrics, so with several workers they
cover all of them; upstream state, most pulled images and recent errors are the
answering worker's own. The page refreshes itself; it needs no JavaScript.
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from proxy import metrics, tls
from proxy.access import route_name
from proxy.auth import Gate
from proxy.errors import RegistryError
from proxy.health import upstream_state
from proxy.observe import FROM_CACHE, Activity, classify
from proxy.routing import Router

REFRESH_SECONDS = 10
OUTCOMES = ("hit", "revalidated", "stale", "joined", "miss")
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_DIGEST = re.compile(r"\b(sha256:[0-9a-f]{12})[0-9a-f]{52}\b")

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d232b; background: #f5f6f8; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 17px; margin: 0 0 10px; }
.sub, .note { color: #5b6572; font-size: 13px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 14px 18px; margin-top: 16px; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 16px; }
.big { font-size: 26px; font-weight: 600; }
.bar { height: 10px; background: #e4e7eb; border-radius: 5px; overflow: hidden; margin: 6px 0; }
.bar div { height: 100%; background: #2f6fde; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #eceef1; vertical-align: top; }
th { font-size: 13px; color: #5b6572; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.nowrap { white-space: nowrap; }
code { font: 13px ui-monospace, monospace; overflow-wrap: anywhere; }
.state { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px; font-weight: 600; }
.ok { background: #dcf3e3; color: #17663a; } .failing { background: #fbe0e0; color: #a32020; }
.unknown { background: #eceef1; color: #5b6572; } .warn { background: #fdf0d5; color: #8a5300; }
"""


async def page(request: Request) -> Response:
    state = request.app.state
    await state.sampler.sample()
    snapshot = await to_thread.run_sync(lambda: metrics.Snapshot(metrics.collected()))
    router: Router = state.router
    upstreams = [upstream_state(upstream) for upstream in router.upstreams()]
    visible = await _visibility(request)
    body = render(snapshot, upstreams, state.activity, time.time(), visible, tls.describe_server())
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})


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


def render(
    snapshot: metrics.Snapshot,
    upstreams: list[dict[str, object]],
    activity: Activity,
    now: float,
    visible: Callable[[str], bool] = lambda name: True,
    server_tls: Mapping[str, object] | None = None,
) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>pullproxy status</title><style>{_STYLE}</style></head>
<body><main>
<h1>pullproxy</h1>
<div class="sub">Pull-through registry mirror · {_clock(now)} UTC · refreshes every {REFRESH_SECONDS} s ·
<a href="/metrics">metrics</a> · <a href="/readyz">readiness</a></div>
{_overview(snapshot)}
{_tls(server_tls or {"enabled": False}, now)}
{_upstreams(snapshot, upstreams, now)}
{_pulls(activity, visible)}
{_errors(activity, now, visible)}
<p class="note">{_scope_note(activity)}</p>
</main></body></html>
"""


def _overview(snapshot: metrics.Snapshot) -> str:
    size = snapshot.total("pullproxy_cache_size_bytes")
    limit = snapshot.total("pullproxy_cache_limit_bytes")
    used = min(100.0, 100 * size / limit) if limit else 0.0
    percent = "<1%" if 0 < used < 1 else f"{used:.0f}%"
    counts = {
        outcome: sum(
            snapshot.total("pullproxy_cache_requests_total", kind=kind, outcome=outcome)
            for kind in ("manifest", "blob")
        )
        for outcome in OUTCOMES
    }
    answered = sum(counts.values())
    from_cache = sum(counts[outcome] for outcome in FROM_CACHE)
    ratio = f"{100 * from_cache / answered:.1f}%" if answered else "none yet"
    served = snapshot.total("pullproxy_cache_served_bytes_total")
    fetched = snapshot.total("pullproxy_upstream_fetched_bytes_total")
    breakdown = " · ".join(f"{outcome} {_count(counts[outcome])}" for outcome in OUTCOMES)
    return f"""<section><div class="figures">
<div><h2>Cache</h2><div class="big" id="cache-use">{_bytes(size)} of {_bytes(limit)}</div>
<div class="bar" role="img" aria-label="{percent} used"><div style="width:{used:.1f}%"></div></div>
<div class="sub">{_e(percent)} used · {_count(snapshot.total("pullproxy_cache_entries"))} entries ·
{_count(snapshot.total("pullproxy_cache_evictions_total"))} evicted</div></div>
<div><h2>Hit ratio</h2><div class="big" id="hit-ratio">{ratio}</div>
<div class="sub">of {_count(answered)} manifest and blob requests came from the cache<br>{breakdown}</div></div>
<div><h2>Traffic</h2><div class="big">{_bytes(served)}</div>
<div class="sub">served from the cache · {_bytes(fetched)} fetched from upstreams<br>
{_count(snapshot.total("pullproxy_downloads_in_flight"))} downloads in flight,
{_count(snapshot.total("pullproxy_download_clients"))} clients receiving them</div></div>
</div></section>"""


def _upstreams(snapshot: metrics.Snapshot, upstreams: list[dict[str, object]], now: float) -> str:
    rows = []
    for upstream in upstreams:
        name = str(upstream["name"])
        error = upstream["last_error"]
        rows.append(
            [
                f'<b>{_e(name)}</b><br><code class="nowrap">{_e(upstream["url"])}</code>',
                f'<span class="state {upstream["state"]}">{upstream["state"]}</span>'
                + _backoff(upstream, now)
                + _trust(upstream),
                _ago(upstream["last_ok"], now),
                f"{_ago(error['at'], now)}: {_code(error['what'])}" if isinstance(error, dict) else "none",
                _count(snapshot.total("pullproxy_upstream_request_duration_seconds_count", upstream=name)),
                _count(snapshot.total("pullproxy_upstream_errors_total", upstream=name)),
                _bytes(snapshot.total("pullproxy_upstream_fetched_bytes_total", upstream=name)),
            ]
        )
    headers = ["Registry", "State", "Last success", "Last error", "#Requests", "#Errors", "#Fetched"]
    return _section("upstreams", "Upstreams", _table(headers, rows))


def _backoff(upstream: dict[str, object], now: float) -> str:
    until = upstream.get("backoff_until")
    if not isinstance(until, int | float):
        return ""
    return f'<br><span class="sub">not asked, next try in {max(0, round(until - now))} s</span>'


def _trust(upstream: Mapping[str, object]) -> str:
    if upstream.get("tls") != tls.UpstreamTrust.NOT_VERIFIED:
        return ""
    return ' <span class="state warn" title="insecure_skip_verify = true">TLS not verified</span>'


def _tls(server: Mapping[str, object], now: float) -> str:
    """Whether clients' credentials cross the network encrypted, and until when the certificate holds."""
    if not server.get("enabled"):
        text = (
            '<span class="state warn">plain HTTP</span> passwords and tokens cross the network in clear; '
            "<code>tls_cert</code> and <code>tls_key</code> in <code>[server]</code> turn HTTPS on"
        )
        return _section("tls", "TLS", f"<p>{text}</p>")
    certificate = server["certificate"]
    assert isinstance(certificate, dict)
    not_after = float(certificate["not_after"])
    days = (not_after - now) / 86400
    style = "failing" if days < 0 else "warn" if days < tls.EXPIRY_WARNING_DAYS else "ok"
    left = "expired" if days < 0 else f"in {days:.0f} d" if days >= 2 else f"in {max(0, int(days * 24))} h"
    clients = "client certificates required" if server.get("client_certificates") == "required" else ""
    lines = [
        f'<span class="state ok">HTTPS</span> <code>{_e(certificate["subject"])}</code>'
        f" · issued by <code>{_e(certificate['issuer'])}</code>" + (f" · {clients}" if clients else ""),
        f'Certificate expires {_clock(not_after)} UTC <span class="state {style}">{left}</span>'
        f' · SHA-256 <code title="{_e(certificate["sha256"])}">{_e(str(certificate["sha256"])[:16])}…</code>',
    ]
    error = server.get("rotation_error")
    if isinstance(error, dict):
        lines.append(
            f'<span class="state failing">rotation failed</span> {_ago(error["at"], now)}: {_e(error["why"])};'
            " the certificate above is still served"
        )
    return _section("tls", "TLS", "".join(f"<p>{line}</p>" for line in lines))


def _pulls(activity: Activity, visible: Callable[[str], bool]) -> str:
    pulled = [(image, count) for image, count in activity.most_pulled(50) if visible(image.rpartition(":")[0])]
    rows = [[f"<code>{_e(image)}</code>", _count(count)] for image, count in pulled[:10]]
    return _section("pulls", "Most pulled images", _table(["Image", "#Pulls"], rows) if rows else _none("no pulls yet"))


def _errors(activity: Activity, now: float, visible: Callable[[str], bool]) -> str:
    names = ((failure, classify(failure.path)[1]) for failure in activity.errors)
    shown = [failure for failure, name in names if not name or visible(name)]
    rows = [
        [
            f'<span class="nowrap">{_clock(failure.at)}</span><br><span class="sub">{_ago(failure.at, now)}</span>',
            str(failure.status),
            _code(f"{failure.method} {failure.path}"),
            _e(_short(failure.message)),
        ]
        for failure in shown[:20]
    ]
    table = _table(["When (UTC)", "#Status", "Request", "Why"], rows) if rows else _none("no errors")
    return _section("errors", "Recent errors", table)


def _section(id_: str, title: str, content: str) -> str:
    return f'<section id="{id_}"><h2>{title}</h2>{content}</section>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already; a header starting with `#` marks a right-aligned numeric column."""
    classes = [' class="num"' if header.startswith("#") else "" for header in headers]
    head = "".join(f"<th{cls}>{header.lstrip('#')}</th>" for header, cls in zip(headers, classes, strict=True))
    body = "".join(
        "<tr>" + "".join(f"<td{cls}>{cell}</td>" for cell, cls in zip(row, classes, strict=True)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _scope_note(activity: Activity) -> str:
    since = f"since {_clock(activity.since)} UTC"
    if not metrics.MULTIPROCESS:
        return f"Pulls count tag lookups {since}."
    return (
        "Cache, hit ratio, traffic and upstream counts cover all workers. Upstream state, most pulled images "
        f"and recent errors are this worker's (pid {os.getpid()}) {since}; pulls count tag lookups."
    )


def _none(text: str) -> str:
    return f'<p class="sub">{text}</p>'


def _e(value: object) -> str:
    return html.escape(str(value))


def _short(text: str) -> str:
    """Digests cut to their first 12 hex digits, for reading."""
    return _DIGEST.sub(r"\1…", text)


def _code(text: str) -> str:
    """Code with digests shortened; the full text shows on hover."""
    return f'<code title="{_e(text)}">{_e(_short(text))}</code>'


def _count(value: float) -> str:
    return f"{int(value):,}"


def _bytes(value: float) -> str:
    power = 0
    while value >= 1024 and power < len(_UNITS) - 1:
        value /= 1024
        power += 1
    return f"{value:.0f} B" if power == 0 else f"{value:.1f} {_UNITS[power]}"


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(at: object, now: float) -> str:
    if not isinstance(at, int | float):
        return "never"
    seconds = max(0, int(now - at))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"
