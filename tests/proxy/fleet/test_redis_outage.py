"""`python -m proxy serve` with `[coordination] redis`: Redis stopped, the replica keeps serving
(by digest as usual, tags from the upstream), `/readyz` says degraded; Redis back, it recovers
without a restart. And replicas list each other."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import redis

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy
from tests.support.redis_server import RedisServer

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
TAGS = "pullproxy:meta:tags:docker.io/acme/app"
LINKS = "pullproxy:meta:links:docker.io/acme/app"


def wait_for(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {seconds:.0f}s")
        time.sleep(0.2)


def replica(upstream: FaultyRegistry, server: RedisServer, tag_ttl: str = "30s") -> Proxy:
    config = {"cache": {"tag_ttl": tag_ttl}, "coordination": {"redis": server.url}}
    return Proxy(config, upstream_url=upstream.url)


def test_a_replica_serves_through_a_redis_outage_and_recovers_without_a_restart() -> None:
    with RedisServer() as server, FaultyRegistry() as upstream, replica(upstream, server, "1s") as proxy:
        manifest, layers = upstream.add_image("acme/app", "1", (1024, 2048))
        upstream.add_image("acme/app", "2", (512,))
        upstream.add_image("acme/app", "3", (256,))
        get = lambda path, **kw: httpx.get(f"{proxy.url}{path}", timeout=10, **kw)  # noqa: E731
        assert get("/v2/acme/app/manifests/1", headers=ACCEPT).status_code == 200
        for layer in layers:
            assert get(f"/v2/acme/app/blobs/{layer}").status_code == 200
        shared = redis.Redis.from_url(server.url)
        assert shared.hget(TAGS, "1") is not None and shared.hlen(LINKS) >= 3
        assert get("/readyz").json()["status"] == "ok"

        server.stop()
        for layer in layers:  # by digest, as usual
            answer = get(f"/v2/acme/app/blobs/{layer}")
            assert answer.status_code == 200 and answer.content == upstream.blob(layer)
        assert get(f"/v2/acme/app/manifests/{manifest}", headers=ACCEPT).status_code == 200
        assert get("/v2/acme/app/manifests/2", headers=ACCEPT).status_code == 200  # a new tag: from the upstream
        time.sleep(1.2)  # past tag_ttl
        asked = upstream.count("HEAD", "/manifests/1")
        answer = get("/v2/acme/app/manifests/1", headers=ACCEPT)
        assert answer.status_code == 200 and answer.headers["Docker-Content-Digest"] == manifest
        assert upstream.count("HEAD", "/manifests/1") == asked + 1  # revalidated with the upstream
        wait_for(lambda: get("/readyz").json()["status"] == "degraded", "degraded")
        ready = get("/readyz")
        assert ready.status_code == 200  # it serves: no reason to take it out of rotation
        assert "redis unreachable" in ready.json()["degraded"][0]
        assert ready.json()["coordination"]["redis"]["state"] == "failing"
        page = get("/").text
        assert '<section id="fleet"><h2>Fleet</h2>' in page and '<span class="state failing">degraded</span>' in page

        server.start()  # an empty Redis (no persistence), same port
        wait_for(lambda: get("/readyz").json()["status"] == "ok", "recovered")
        wait_for(lambda: shared.hlen(LINKS) >= 2, "links learnt during the outage written")  # tag 2's
        assert get("/v2/acme/app/manifests/3", headers=ACCEPT).status_code == 200
        assert shared.hget(TAGS, "3") is not None  # written to Redis again
        assert "Traceback" not in proxy.log_text()
        shared.close()


def test_replicas_list_each_other_in_readyz_and_on_the_status_page() -> None:
    with (
        RedisServer() as server,
        FaultyRegistry() as upstream,
        replica(upstream, server) as one,
        replica(upstream, server) as other,
    ):

        def listed(proxy: Proxy) -> list[str]:
            return [r["url"] for r in httpx.get(f"{proxy.url}/readyz", timeout=5).json()["coordination"]["replicas"]]

        wait_for(lambda: sorted(listed(one)) == sorted([one.url, other.url]), "listed by one")
        wait_for(lambda: sorted(listed(other)) == sorted([one.url, other.url]), "listed by the other")
        page = httpx.get(f"{one.url}/", timeout=5).text
        assert f'<code class="nowrap">{other.url}</code>' in page and "(this one)" in page
        other.stop()  # leaves cleanly: its record is deleted
        wait_for(lambda: listed(one) == [one.url], "the stopped replica gone")
