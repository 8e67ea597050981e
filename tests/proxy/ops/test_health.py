"""/healthz and /readyz: cheap JSON answers an orchestrator can act on."""

from __future__ import annotations

import shutil
import time

import httpx

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


def test_healthz_says_the_process_answers() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        upstream.stop()  # liveness does not depend on any upstream
        response = httpx.get(f"{proxy.url}/healthz", timeout=5)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_readyz_reports_each_upstreams_last_known_state() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        _, blobs = upstream.add_image("acme/app", "1")

        def ready() -> dict:
            response = httpx.get(f"{proxy.url}/readyz", timeout=5)
            assert response.status_code == 200  # an upstream's trouble is no reason to leave rotation
            body = response.json()
            assert body["ready"] is True and body["cache"] == {"writable": True, "problem": None}
            (state,) = body["upstreams"]
            assert state["name"] == "docker.io" and state["url"] == upstream.url
            return state

        state = ready()
        assert (state["state"], state["last_ok"], state["last_error"]) == ("unknown", None, None)
        httpx.get(f"{proxy.url}/v2/acme/app/blobs/{blobs[0]}", timeout=10).raise_for_status()
        state = ready()
        assert state["state"] == "ok" and state["last_ok"] <= time.time()
        upstream.fail(503)
        assert httpx.get(f"{proxy.url}/v2/acme/app/blobs/{blobs[1]}", timeout=10).status_code == 503
        state = ready()
        assert state["state"] == "failing"
        assert state["last_error"]["what"] == "GET blobs: 503"  # no repository name: anyone may read it
        assert state["last_error"]["at"] >= state["last_ok"]


def test_readyz_is_503_while_the_cache_cannot_be_written() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        partial = proxy.cache_dir / "partial"
        # Where every download is written first. A file in its place fails writes even for root.
        shutil.rmtree(partial)
        partial.write_text("not a directory")
        body = _wait_for_readyz(proxy, 503)
        assert body["ready"] is False and body["cache"]["writable"] is False
        assert str(partial) in body["cache"]["problem"]
        assert httpx.get(f"{proxy.url}/healthz", timeout=5).status_code == 200

        partial.unlink()
        partial.mkdir()
        assert _wait_for_readyz(proxy, 200)["ready"] is True


def _wait_for_readyz(proxy: Proxy, status: int, timeout: float = 10.0) -> dict:
    """The answer is remembered for a couple of seconds, so a change shows up a little later."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{proxy.url}/readyz", timeout=5)
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response.json()
        time.sleep(0.2)
