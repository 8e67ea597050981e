"""The mirror on the fleet's Redis (`[coordination]`): tags revalidated once per `tag_ttl` for the
fleet, and what still works while Redis is away (by digest, tags from the upstream or stale)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest

from proxy.config import Coordination
from tests.support.inprocess import MemoryRegistry, mirror_client
from tests.support.redis_server import RedisServer

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


class SwitchableRegistry(MemoryRegistry):
    """A `MemoryRegistry` that can be unreachable (every request a connection error)."""

    down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return await super().handle_async_request(request)


class SlowHeadRegistry(MemoryRegistry):
    """A `MemoryRegistry` whose manifest HEADs take a while, so replicas' checks overlap."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD" and "/manifests/" in request.url.path:
            await anyio.sleep(0.4)
        return await super().handle_async_request(request)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def heads(upstream: MemoryRegistry, path: str) -> int:
    return sum(1 for method, asked in upstream.asked() if method == "HEAD" and asked == path)


def wait_for(check: object, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not callable(check) or not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {seconds:.0f}s")
        time.sleep(0.1)


def test_a_tag_is_revalidated_once_per_tag_ttl_for_the_fleet(tmp_path: Path, redis_server: RedisServer) -> None:
    upstream = MemoryRegistry()
    upstream.add_image("team/app", "1", b"layer")
    shared = Coordination(redis=redis_server.url)
    with (
        mirror_client(tmp_path / "a", upstream, coordination=shared, tag_ttl=2.0) as one,
        mirror_client(tmp_path / "b", upstream, coordination=shared, tag_ttl=2.0) as other,
    ):
        one.get("/v2/team/app/manifests/1", headers=ACCEPT).raise_for_status()
        other.get("/v2/team/app/manifests/1", headers=ACCEPT).raise_for_status()  # both hold it in memory now
        time.sleep(2.2)  # past tag_ttl for both
        assert one.get("/v2/team/app/manifests/1", headers=ACCEPT).status_code == 200
        assert heads(upstream, "/v2/team/app/manifests/1") == 1  # one revalidated it
        answer = other.get("/v2/team/app/manifests/1", headers=ACCEPT)
        assert answer.status_code == 200
        assert heads(upstream, "/v2/team/app/manifests/1") == 1  # the other took its word for it


def test_replicas_that_find_a_tag_stale_at_once_ask_the_upstream_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    upstream = SlowHeadRegistry()
    upstream.add_image("team/app", "1", b"layer")
    shared = Coordination(redis=redis_server.url)
    with (
        mirror_client(tmp_path / "a", upstream, coordination=shared, tag_ttl=1.0) as one,
        mirror_client(tmp_path / "b", upstream, coordination=shared, tag_ttl=1.0) as other,
        ThreadPoolExecutor(2) as pool,
    ):
        for client in (one, other):
            client.get("/v2/team/app/manifests/1", headers=ACCEPT).raise_for_status()
        time.sleep(1.1)  # stale for both
        answers = list(pool.map(lambda c: c.get("/v2/team/app/manifests/1", headers=ACCEPT), (one, other)))
        assert [a.status_code for a in answers] == [200, 200]
        assert heads(upstream, "/v2/team/app/manifests/1") == 1  # one checked it, the other waited for its answer


def test_with_redis_down_digests_and_tags_still_answer_and_readyz_says_degraded(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    upstream = SwitchableRegistry()
    manifest, config, layer = upstream.add_image("team/app", "1", b"layer")
    upstream.add_image("team/app", "2", b"other layer")
    shared = Coordination(redis=redis_server.url)
    with mirror_client(tmp_path / "a", upstream, coordination=shared) as warm:
        warm.get("/v2/team/app/manifests/1", headers=ACCEPT).raise_for_status()
        warm.get(f"/v2/team/app/blobs/{layer}").raise_for_status()
        ready = warm.get("/readyz").json()
        assert ready["status"] == "ok" and ready["coordination"]["redis"]["state"] == "ok"
        (replica,) = ready["coordination"]["replicas"]
        assert replica["id"] == ready["coordination"]["replica"] and replica["url"].startswith("http")

        redis_server.stop()
        asked = len(upstream.requests)
        assert warm.get(f"/v2/team/app/blobs/{layer}").content == b"layer"  # by digest: memory knows the link
        assert warm.get(f"/v2/team/app/manifests/{manifest}", headers=ACCEPT).status_code == 200
        assert warm.get("/v2/team/app/manifests/1", headers=ACCEPT).status_code == 200  # fresh in memory
        assert len(upstream.requests) == asked
        tagged = warm.get("/v2/team/app/manifests/2", headers=ACCEPT)  # never seen: asked upstream
        assert tagged.status_code == 200 and tagged.headers["Docker-Content-Digest"] != manifest
        assert warm.get("/v2/team/app/tags/list").json()["tags"] == ["1", "2"]
        assert warm.get("/v2/_catalog").status_code == 503  # no fallback: said so, not a 500
        wait_for(lambda: warm.get("/readyz").json()["status"] == "degraded", "degraded")
        ready = warm.get("/readyz")
        assert ready.status_code == 200  # still in rotation: it serves
        assert "redis" in ready.json()["degraded"][0]
        assert ready.json()["coordination"]["redis"]["state"] == "failing"

        with mirror_client(tmp_path / "b", upstream, coordination=shared, tag_ttl=0.5) as cold:
            assert cold.get(f"/v2/team/app/blobs/{config}").status_code == 200  # the upstream confirms the link
            assert cold.get("/v2/team/app/manifests/1", headers=ACCEPT).status_code == 200  # tag from upstream
            time.sleep(0.6)
            upstream.down = True
            stale = cold.get("/v2/team/app/manifests/1", headers=ACCEPT)  # upstream down too: from memory
            assert stale.status_code == 200 and stale.headers["Docker-Content-Digest"] == manifest
            assert cold.get("/v2/team/app/manifests/2", headers=ACCEPT).status_code == 503  # known nowhere
            upstream.down = False

        redis_server.start()
        wait_for(lambda: warm.get("/readyz").json()["status"] == "ok", "recovered")
        assert warm.get("/v2/_catalog").json() == {"repositories": []}  # an empty Redis: no persistence
        upstream.add_image("team/app", "3", b"third layer")
        assert warm.get("/v2/team/app/manifests/3", headers=ACCEPT).status_code == 200
        assert warm.get("/v2/_catalog").json() == {"repositories": ["team/app"]}
