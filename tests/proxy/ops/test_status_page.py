"""The status page at `/`, as a person's browser shows it."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from proxy.config import UpstreamConfig
from proxy.ops import metrics, status
from proxy.ops.health import upstream_state
from proxy.ops.observe import Activity, Failure
from proxy.upstream.client import Upstream
from tests.support.browser import dump_dom, screenshot
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


def text_of(page: str, element_id: str) -> str:
    """The visible text of the element with that id, whitespace collapsed."""
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</(section|div)>', page, re.DOTALL)
    assert match is not None, f"no element {element_id!r} in the page"
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", match.group(1))).split())


def test_status_page_in_a_browser_shows_cache_hit_ratio_pulls_upstreams_and_errors(tmp_path: Path) -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        _, blobs = upstream.add_image("acme/app", "1.2", layer_sizes=[300_000])
        upstream.fail(503, path="/manifests/", times=1)
        assert httpx.get(f"{proxy.url}/v2/acme/app/manifests/1.2", timeout=10).status_code == 503
        for _ in range(2):  # a miss, then a hit, for the manifest and each blob
            httpx.get(f"{proxy.url}/v2/acme/app/manifests/1.2", timeout=10).raise_for_status()
            for digest in blobs:
                httpx.get(f"{proxy.url}/v2/acme/app/blobs/{digest}", timeout=10).raise_for_status()

        page = dump_dom(f"{proxy.url}/")

        assert "<script" not in page
        assert re.fullmatch(r"\d+\.\d KiB of 1\.0 GiB", text_of(page, "cache-use"))
        assert text_of(page, "hit-ratio") == "50.0%"
        assert "acme/app:1.2 2" in text_of(page, "pulls")
        assert f"docker.io {upstream.url} ok" in text_of(page, "upstreams")
        errors = text_of(page, "errors")
        assert "503 GET /v2/acme/app/manifests/1.2 docker.io: answered 503" in errors

        picture = screenshot(f"{proxy.url}/", tmp_path / "status.png")
        assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 10_000


def test_status_page_escapes_what_it_shows_and_says_when_there_is_nothing_yet() -> None:
    activity = Activity()
    activity.pulled("acme/<b>app</b>:1")
    activity.failed(Failure(time.time(), "GET", "/v2/<i>x</i>/manifests/1", 502, "<script>alert(1)</script>"))
    upstream = upstream_state(Upstream(UpstreamConfig(name="docker.io", url="https://r.example")))

    page = status.render(metrics.Snapshot(CollectorRegistry()), [upstream], activity, time.time())

    assert "<script>" not in page and "<b>app" not in page and "<i>x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert text_of(page, "hit-ratio") == "none yet"
    assert "docker.io https://r.example unknown never none" in text_of(page, "upstreams")
