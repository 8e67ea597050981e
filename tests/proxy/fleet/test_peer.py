"""The peer endpoint and the peer origin, in process: two replicas' apps on one event loop, a real
Redis for the leases, the upstream in memory (no socket but Redis's on loopback)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
import redis
from anyio.from_thread import start_blocking_portal
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from proxy.config import Config, Coordination, UpstreamConfig
from proxy.fleet.peer import BLOB_PATH, Fleet, PeerClient, authenticate
from proxy.fleet.peers import HEADER, PeerCredentials, Replica
from proxy.http.app import create_app
from proxy.ops.metrics import FetchedBy, Snapshot, collected
from tests.support.inprocess import UPSTREAM_URL, MemoryRegistry, _PortalTransport
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

SECRET = "the fleet's secret"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@dataclass
class Replicas:
    a: httpx.Client
    b: httpx.Client
    a_app: Starlette
    b_app: Starlette
    upstream: MemoryRegistry

    def fleet(self, app: Starlette) -> Fleet:
        fleet: Fleet = app.state.peer_fleet
        return fleet


def _config(directory: Path, redis_url: str, url: str, secret: str | None = SECRET) -> Config:
    return Config(
        cache_dir=directory,
        max_size=64 << 20,
        upstreams=(UpstreamConfig(name="registry.test", url=UPSTREAM_URL, default=True),),
        coordination=Coordination(redis=redis_url, advertise_url=url, peer_secret=secret),
    )


@contextmanager
def _replicas(
    tmp_path: Path, redis_url: str, secret: str | None = SECRET, b_secret: str | None = SECRET
) -> Iterator[Replicas]:
    """Replicas a (http://a.test) and b (http://b.test); b's peer requests go to a's app."""
    upstream = MemoryRegistry()
    a_app = create_app(_config(tmp_path / "a", redis_url, "http://a.test", secret), {"registry.test": upstream})
    b_app = create_app(_config(tmp_path / "b", redis_url, "http://b.test", b_secret), {"registry.test": upstream})
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())
        stack.enter_context(portal.wrap_async_context_manager(a_app.router.lifespan_context(a_app)))
        stack.enter_context(portal.wrap_async_context_manager(b_app.router.lifespan_context(b_app)))
        b_fleet: Fleet = b_app.state.peer_fleet
        if b_fleet.flight is not None:
            to_a = httpx.ASGITransport(a_app, client=("127.0.0.2", 40000))
            b_fleet.flight.peers = PeerClient(b_fleet.credentials, transport=to_a)
        a = stack.enter_context(httpx.Client(transport=_PortalTransport(portal, a_app), base_url="http://a.test"))
        b = stack.enter_context(httpx.Client(transport=_PortalTransport(portal, b_app), base_url="http://b.test"))
        yield Replicas(a, b, a_app, b_app, upstream)


def _hold_lease(redis_url: str, digest: str, replica: Replica) -> None:
    """Make `replica` the blob's lease holder, as if its download were running."""
    client = redis.Redis.from_url(redis_url)
    client.set(f"pullproxy:lease:{digest}", json.dumps({"replica": replica.id, "url": replica.url}), px=30_000)
    client.close()


def _peer_get(replicas: Replicas, digest: str, credentials: PeerCredentials | None) -> httpx.Response:
    path = BLOB_PATH.format(digest=digest)
    headers = {} if credentials is None else {HEADER: credentials.issue("GET", path)}
    return replicas.a.get(path, headers=headers)


def _code(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["code"])


def test_the_peer_endpoint_answers_only_a_valid_peer_credential(tmp_path: Path, server: RedisServer) -> None:
    with _replicas(tmp_path, server.url) as replicas:
        digest = replicas.upstream.add_blob("team/app", b"layer bytes")
        assert replicas.a.get(f"/v2/team/app/blobs/{digest}").content == b"layer bytes"  # cached on a
        ours = replicas.fleet(replicas.b_app).credentials
        stranger = PeerCredentials("another secret", Replica("x-1-z", "http://x.test"))

        missing = _peer_get(replicas, digest, None)
        assert (missing.status_code, _code(missing)) == (401, "UNAUTHORIZED")
        wrong = _peer_get(replicas, digest, stranger)
        assert (wrong.status_code, _code(wrong)) == (403, "DENIED")
        other_path = replicas.a.get(
            BLOB_PATH.format(digest=digest), headers={HEADER: ours.issue("GET", BLOB_PATH.format(digest="sha256:00"))}
        )
        assert (other_path.status_code, _code(other_path)) == (403, "DENIED")

        served = _peer_get(replicas, digest, ours)
        assert (served.status_code, served.content) == (200, b"layer bytes")
        assert served.headers["Docker-Content-Digest"] == digest
        unknown = _peer_get(replicas, digest.replace("sha256:", "sha256:0")[:71], ours)
        assert (unknown.status_code, _code(unknown)) == (404, "BLOB_UNKNOWN")
        bad = _peer_get(replicas, "sha256:nothex", ours)
        assert (bad.status_code, _code(bad)) == (400, "DIGEST_INVALID")


def test_without_a_peer_secret_peer_requests_are_refused(tmp_path: Path, server: RedisServer) -> None:
    with _replicas(tmp_path, server.url, secret=None, b_secret=None) as replicas:
        digest = replicas.upstream.add_blob("team/app", b"layer bytes")
        assert replicas.a.get(f"/v2/team/app/blobs/{digest}").status_code == 200
        assert replicas.fleet(replicas.a_app).flight is None
        forged = PeerCredentials("guess", Replica("x-1-z", "http://x.test"))
        refused = _peer_get(replicas, digest, forged)
        assert (refused.status_code, _code(refused)) == (403, "DENIED")


def test_a_follower_takes_the_bytes_from_the_holder_and_still_checks_its_clients_repository(
    tmp_path: Path, server: RedisServer
) -> None:
    with _replicas(tmp_path, server.url) as replicas:
        digest = replicas.upstream.add_blob("team/app", b"only team/app holds this")
        assert replicas.a.get(f"/v2/team/app/blobs/{digest}").status_code == 200
        _hold_lease(server.url, digest, replicas.fleet(replicas.a_app).replica)
        replicas.upstream.requests.clear()
        peer_before = Snapshot(collected()).fleet_fetches(FetchedBy.PEER)

        # Another repository asks b: b's download follows a, but the upstream says the repository lacks it.
        refused = replicas.b.get(f"/v2/other/app/blobs/{digest}")
        assert (refused.status_code, _code(refused)) == (404, "BLOB_UNKNOWN")
        assert replicas.upstream.asked() == [("HEAD", f"/v2/other/app/blobs/{digest}")]
        assert Snapshot(collected()).fleet_fetches(FetchedBy.PEER) == peer_before + 1

        # Its own repository: served, from b's copy (committed by that download), no GET upstream.
        served = replicas.b.get(f"/v2/team/app/blobs/{digest}")
        assert (served.status_code, served.content) == (200, b"only team/app holds this")
        # (With the metadata in Redis too, b may know team/app's link already and ask no second HEAD.)
        assert "GET" not in [method for method, _ in replicas.upstream.asked()]


def test_a_follower_whose_holder_is_gone_waits_for_the_lease_and_fetches_itself(
    tmp_path: Path, server: RedisServer
) -> None:
    with _replicas(tmp_path, server.url) as replicas:
        digest = replicas.upstream.add_blob("team/app", b"the holder never answers")
        flight = replicas.fleet(replicas.b_app).flight
        assert flight is not None
        flight.wait_limit = 30.0
        client = redis.Redis.from_url(server.url)
        gone = {"replica": "dead-1-x", "url": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
        client.set(f"pullproxy:lease:{digest}", json.dumps(gone), px=1500)
        client.close()
        flight.peers = PeerClient(flight.peers.credentials)  # a real client: the dead holder's port refuses
        waits_before = Snapshot(collected()).total("pullproxy_fleet_lease_waits_total")

        served = replicas.b.get(f"/v2/team/app/blobs/{digest}")
        assert (served.status_code, served.content) == (200, b"the holder never answers")
        assert replicas.upstream.asked().count(("GET", f"/v2/team/app/blobs/{digest}")) == 1
        assert Snapshot(collected()).total("pullproxy_fleet_lease_waits_total") == waits_before + 1


def test_with_redis_unreachable_each_replica_fetches_alone(tmp_path: Path) -> None:
    with _replicas(tmp_path, f"redis://127.0.0.1:{free_port()}/0") as replicas:
        digest = replicas.upstream.add_blob("team/app", b"no redis")
        alone_before = Snapshot(collected()).fleet_fetches(FetchedBy.ALONE)
        assert replicas.a.get(f"/v2/team/app/blobs/{digest}").content == b"no redis"
        assert replicas.b.get(f"/v2/team/app/blobs/{digest}").content == b"no redis"
        assert replicas.upstream.asked().count(("GET", f"/v2/team/app/blobs/{digest}")) == 2
        assert Snapshot(collected()).fleet_fetches(FetchedBy.ALONE) == alone_before + 2


def test_a_follower_whose_credential_the_holder_refuses_fetches_alone_at_once(
    tmp_path: Path, server: RedisServer
) -> None:
    with _replicas(tmp_path, server.url, b_secret="not the fleet's secret") as replicas:
        digest = replicas.upstream.add_blob("team/app", b"refused")
        assert replicas.a.get(f"/v2/team/app/blobs/{digest}").status_code == 200
        _hold_lease(server.url, digest, replicas.fleet(replicas.a_app).replica)
        replicas.upstream.requests.clear()
        before = Snapshot(collected())

        served = replicas.b.get(f"/v2/team/app/blobs/{digest}")
        assert (served.status_code, served.content) == (200, b"refused")
        assert replicas.upstream.asked() == [("GET", f"/v2/team/app/blobs/{digest}")]
        after = Snapshot(collected())
        assert after.fleet_fetches(FetchedBy.ALONE) == before.fleet_fetches(FetchedBy.ALONE) + 1
        assert after.total("pullproxy_fleet_lease_waits_total") == before.total("pullproxy_fleet_lease_waits_total")


class _Gated(httpx.AsyncByteStream):
    """A blob body that sends its first half, then waits for `go` before the rest."""

    def __init__(self, data: bytes, go: threading.Event) -> None:
        self.data, self.go = data, go

    async def __aiter__(self) -> AsyncIterator[bytes]:
        half = len(self.data) // 2
        yield self.data[:half]
        for _ in range(2000):
            if self.go.is_set():
                break
            await asyncio.sleep(0.01)
        yield self.data[half:]


class _GatedRegistry(MemoryRegistry):
    go: threading.Event = threading.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.method == "GET" and "/blobs/" in request.url.path and response.status_code == 200:
            data = self.blobs[("team/app", request.url.path.rsplit("/", 1)[1])]
            return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=_Gated(data, self.go))
        return response


def test_a_peer_request_reaching_another_worker_follows_the_download_running_in_the_first(
    tmp_path: Path, server: RedisServer
) -> None:
    """Two workers of one replica (one cache directory, one URL): the peer request lands on the one
    that does not download, which follows the other's partial file instead of answering 404."""
    upstream = _GatedRegistry()
    upstream.go = threading.Event()
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = upstream.add_blob("team/app", data)
    config = _config(tmp_path / "shared", server.url, "http://a.test")
    first = create_app(config, {"registry.test": upstream})
    second = create_app(config.model_copy(update={"workers": 2}), {"registry.test": upstream})
    results: dict[str, httpx.Response] = {}
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())
        for app in (first, second):
            stack.enter_context(portal.wrap_async_context_manager(app.router.lifespan_context(app)))
        one = stack.enter_context(httpx.Client(transport=_PortalTransport(portal, first), base_url="http://a.test"))
        two = stack.enter_context(httpx.Client(transport=_PortalTransport(portal, second), base_url="http://a.test"))
        credentials = PeerCredentials(SECRET, Replica("b-1-x", "http://b.test"))
        path = BLOB_PATH.format(digest=digest)

        def pull() -> None:
            results["client"] = one.get(f"/v2/team/app/blobs/{digest}", timeout=60)

        def peer() -> None:
            results["peer"] = two.get(path, headers={HEADER: credentials.issue("GET", path)}, timeout=60)

        threads = [threading.Thread(target=pull, daemon=True)]
        threads[0].start()
        partial = tmp_path / "shared" / "partial"
        for _ in range(500):  # the first worker's download has half the blob
            if any(f.stat().st_size >= len(data) // 2 for f in partial.glob("*.data")):
                break
            time.sleep(0.01)
        threads.append(threading.Thread(target=peer, daemon=True))
        threads[1].start()
        for _ in range(500):  # the second worker follows it
            if second.state.mirror.downloads.in_flight(digest) is not None:
                break
            time.sleep(0.01)
        assert second.state.mirror.downloads.in_flight(digest) is not None
        upstream.go.set()
        for thread in threads:
            thread.join(60)
    assert (results["client"].status_code, results["client"].content == data) == (200, True)
    assert (results["peer"].status_code, results["peer"].content == data) == (200, True)
    assert upstream.asked().count(("GET", f"/v2/team/app/blobs/{digest}")) == 1


def test_a_peer_client_request_authenticates_on_any_path_with_its_query() -> None:
    """What forwarding (hosted uploads) relies on: the credential covers the path and query as sent."""
    ours = PeerCredentials(SECRET, Replica("a-1-x", "http://a.test"))

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(authenticate(request, ours) + " " + (await request.body()).decode())

    app = Starlette(routes=[Route("/v2/{rest:path}", echo, methods=["GET", "PATCH", "PUT"])])
    sender = PeerClient(PeerCredentials(SECRET, Replica("b-2-y", "http://b.test")), transport=httpx.ASGITransport(app))

    async def main() -> list[tuple[int, str]]:
        answers = []
        for method, path in [
            ("PATCH", "/v2/team/app/blobs/uploads/b-2-y.u1"),
            ("PUT", "/v2/team/app/blobs/uploads/b-2-y.u1?digest=sha256%3Aab&x=a%20b"),
        ]:
            response = await sender.send(method, "http://a.test", path, content=b"chunk")
            await response.aread()
            answers.append((response.status_code, response.text))
        await sender.aclose()
        return answers

    assert anyio.run(main) == [(200, "b-2-y chunk"), (200, "b-2-y chunk")]
