"""What an upstream cannot make the mirror do: hold an endless body, follow a redirect
anywhere, hand its credentials to any realm, or make every request wait out an outage.

Real sockets only on loopback (the fault-injecting upstream); anything that names another
address is tested in-process with an `httpx.MockTransport`, so no packet leaves the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

from cache.flight import DownloadReader, Downloads
from cache.store import DiskContentStore
from proxy.config import UpstreamConfig
from proxy.ops import metrics, status
from proxy.ops.health import upstream_state
from proxy.ops.observe import Activity
from proxy.upstream import client as upstream_module
from proxy.upstream import threaded
from proxy.upstream.client import (
    FAILED_ANSWERS_BEFORE_BACKOFF,
    MAX_REDIRECTS,
    Upstream,
    UpstreamBackingOff,
    UpstreamNotFound,
    UpstreamRedirectRefused,
    UpstreamTooLarge,
    UpstreamUnavailable,
)
from tests.support.faulty import OCI_INDEX, FaultyRegistry, pseudo_random_bytes
from tests.support.proxy import Proxy, mirror

MIB = 1 << 20
ENDLESS = 64 * MIB  # what an "endless" answer may send at most, so a test cannot run away
READ_AT_MOST = 32 * MIB  # the limit plus socket buffers: far below ENDLESS
DIGEST = "sha256:" + "a" * 64
PUBLIC_UPSTREAM = "https://203.0.113.10"  # never connected to: the transport is in-process


@pytest.fixture
def faulty() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def oci_error(response: httpx.Response) -> dict[str, Any]:
    (error,) = response.json()["errors"]
    return dict(error)


# -- 1. bounded bodies -------------------------------------------------------------------

ENDLESS_ANSWERS = {
    "tags/list": ("/v2/acme/app/tags/list", "application/json", b'{"name":"acme/app","tags":["', b'"t",' * 1024, 8),
    "referrers": (f"/v2/acme/app/referrers/{DIGEST}", OCI_INDEX, b'{"schemaVersion":2,"manifests":[', b"{}," * 1024, 4),
    "manifest": ("/v2/acme/app/manifests/1", "application/json", b'{"schemaVersion":2,"layers":[', b"{}," * 1024, 4),
}


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize("kind", ENDLESS_ANSWERS)
def test_an_endless_answer_is_cut_off_at_its_limit_with_an_oci_error(
    faulty: FaultyRegistry, kind: str, declared: bool
) -> None:
    path, content_type, prefix, filler, limit = ENDLESS_ANSWERS[kind]
    faulty.add_image("acme/app", "1")
    endless = faulty.endless(
        path=path.split("/app", 1)[1],
        headers={"Content-Type": content_type},
        prefix=prefix,
        filler=filler,
        total=ENDLESS,
        declare_length=declared,
    )
    with mirror(faulty) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        refused = client.get(path)
        assert refused.status_code == 502
        error = oci_error(refused)
        assert error["code"] == "UNKNOWN"
        assert kind in error["message"] and f"larger than the {limit} MiB limit" in error["message"]
        assert endless.hits == 1 and endless.sent < READ_AT_MOST
        # Nothing was kept: once the upstream behaves, the answer comes from it.
        faulty.remove_fault(endless)
        faulty.reset_log()
        assert client.get(path).status_code == 200
        assert faulty.count("GET", path) == 1
        assert client.get(path).status_code == 200
        assert faulty.count("GET", path) == (2 if kind == "tags/list" else 1)  # a good answer is kept


def test_an_endless_token_answer_is_cut_off_at_1_mib(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    faulty.add_image("acme/app", "1")
    endless = faulty.endless(listener="token", headers={"Content-Type": "application/json"}, prefix=b'{"token":"')
    with mirror(faulty) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        refused = client.get("/v2/acme/app/manifests/1")
        assert refused.status_code == 502
        assert "token answer" in oci_error(refused)["message"] and "1 MiB limit" in oci_error(refused)["message"]
        assert endless.sent < READ_AT_MOST
        faulty.remove_fault(endless)
        assert client.get("/v2/acme/app/manifests/1").status_code == 200


def test_the_body_of_a_challenge_or_a_redirect_is_never_read(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    _, (_, layer) = faulty.add_image("acme/app", "1")
    challenge = f'Bearer realm="{faulty.token_url}",service="{faulty.service}",scope="repository:acme/app:pull"'
    endless_401 = faulty.endless(path="/manifests/1", times=1, status=401, headers={"WWW-Authenticate": challenge})
    # A redirect to the registry itself: followed (loopback to loopback), its body left unread.
    location = f"{faulty.url}/v2/acme/app/blobs/{layer}?again"
    endless_307 = faulty.endless(path=f"/blobs/{layer}", times=1, status=307, headers={"Location": location})
    with mirror(faulty) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.get("/v2/acme/app/manifests/1").status_code == 200
        assert client.get(f"/v2/acme/app/blobs/{layer}").content == faulty.blob(layer)
    assert endless_401.hits == 1 and endless_401.sent < READ_AT_MOST
    assert endless_307.hits == 1 and endless_307.sent < READ_AT_MOST


# -- 2. redirects ------------------------------------------------------------------------


def run(work: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(work())  # type: ignore[arg-type]


class Streamed(httpx.AsyncByteStream):
    """A body as a real transport gives it: not read yet (`content=` would be read at once)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


class Recorded:
    """An in-process upstream: `answer` decides, every request is kept."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.answer(request)

    def hosts(self) -> set[str]:
        return {request.url.host for request in self.seen}

    def upstream(self, url: str = PUBLIC_UPSTREAM, **keys: Any) -> Upstream:
        return Upstream(UpstreamConfig(name="docker.io", url=url, **keys), transport=httpx.MockTransport(self))


@pytest.mark.parametrize(
    "target",
    [
        "http://10.1.2.3/blob",
        "https://10.1.2.3/blob",
        "http://169.254.169.254/latest/meta-data/",
        "https://169.254.169.254/latest/meta-data/",
        "https://127.0.0.1:9/blob",
        "https://[::ffff:10.1.2.3]/blob",
        "https://[fe80::1]/blob",
        "https://192.168.1.1/blob",
        "http://198.51.100.7/blob",  # public, but from https to plain http
        "file:///etc/passwd",
    ],
)
def test_a_blob_redirect_to_where_the_upstream_is_not_is_refused_before_anything_is_sent(target: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "203.0.113.10":
            return httpx.Response(307, headers={"Location": target})
        return httpx.Response(200, content=b"what the metadata service knows")

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            for fetch in (upstream.open_blob, upstream.head_blob):
                with pytest.raises(UpstreamRedirectRefused, match=r"redirect .* refused"):
                    await fetch("acme/app", DIGEST)
        finally:
            await upstream.aclose()

    run(work)
    assert recorded.hosts() == {"203.0.113.10"}
    assert len(recorded.seen) == 2


def test_a_blob_redirect_to_a_public_cdn_is_followed_without_the_registry_credentials() -> None:
    cdn = "https://198.51.100.7/signed/blob?sig=abc"

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "198.51.100.7":
            return httpx.Response(200, stream=Streamed(b"layer"))
        if "Authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return httpx.Response(307, headers={"Location": cdn})

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream(username="robot", password="pa55")
        try:
            source = await upstream.open_blob("acme/app", DIGEST)
            assert b"".join([chunk async for chunk in source.chunks]) == b"layer"
            await source.close()
        finally:
            await upstream.aclose()

    run(work)
    _, with_basic, at_cdn = recorded.seen
    assert with_basic.headers["Authorization"].startswith("Basic ")
    assert str(at_cdn.url) == cdn and "Authorization" not in at_cdn.headers


def test_blob_redirects_are_followed_a_bounded_number_of_times() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": f"/hop{len(recorded.seen)}"})

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            with pytest.raises(UpstreamRedirectRefused, match=f"more than {MAX_REDIRECTS} times"):
                await upstream.open_blob("acme/app", DIGEST)
        finally:
            await upstream.aclose()

    run(work)
    assert len(recorded.seen) == 1 + MAX_REDIRECTS


def test_only_blobs_follow_redirects() -> None:
    elsewhere = "https://198.51.100.7/x"  # a target a blob could be sent to

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/acme/private/manifests/1" and "Authorization" not in request.headers:
            challenge = f'Bearer realm="{PUBLIC_UPSTREAM}/token",service="s"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(307, headers={"Location": elsewhere})

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream()
        asks: list[Callable[[], Awaitable[object]]] = [
            lambda: upstream.get_manifest("acme/app", "1"),
            lambda: upstream.head_manifest("acme/app", "1"),
            lambda: upstream.tags("acme/app", None, None),
            lambda: upstream.referrers("acme/app", DIGEST),
            lambda: upstream.get_manifest("acme/private", "1"),  # its token request is redirected
        ]
        try:
            for ask in asks:
                with pytest.raises(UpstreamRedirectRefused, match="redirect"):
                    await ask()
        finally:
            await upstream.aclose()

    run(work)
    assert recorded.hosts() == {"203.0.113.10"}
    assert [r.url.path for r in recorded.seen][-2:] == ["/v2/acme/private/manifests/1", "/token"]


@pytest.mark.parametrize("path", ["/manifests/1", "/tags/list"])
def test_a_manifest_or_tag_list_served_by_a_redirect_target_is_refused_and_not_cached(path: str) -> None:
    with FaultyRegistry() as origin, FaultyRegistry() as other:
        for registry in (origin, other):
            registry.add_image("acme/app", "1")
        moved = origin.fail(307, path=path, headers={"Location": f"{other.url}/v2/acme/app{path}"}, body=b"")
        with mirror(origin) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
            refused = client.get(f"/v2/acme/app{path}")
            assert refused.status_code == 502
            assert "redirect" in oci_error(refused)["message"]
            assert other.requests() == []
            origin.remove_fault(moved)
            origin.reset_log()
            assert client.get(f"/v2/acme/app{path}").status_code == 200
            assert origin.count("GET", path) == 1  # nothing was cached from the redirect target


def test_a_blob_head_is_redirected_to_the_cdn_on_loopback_too(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    faulty.redirect_blobs = True
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[12345])
    with mirror(faulty) as proxy:
        head = httpx.head(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=10)
    assert head.status_code == 200 and head.headers["Content-Length"] == "12345"
    assert faulty.count("HEAD", "/blobs/", listener="cdn") == 1
    assert faulty.cdn_authorization_headers() == []


# -- 3. credentials go to safe realms only ------------------------------------------------


@pytest.mark.parametrize(
    ("upstream_url", "realm", "with_credentials"),
    [
        ("https://203.0.113.10", "https://198.51.100.9/token", True),
        ("https://203.0.113.10", "http://198.51.100.9/token", False),
        ("https://203.0.113.10", "http://203.0.113.10/token", False),  # plain HTTP, though its own host
        ("http://203.0.113.10", "http://203.0.113.10:5001/token", True),  # a plain-HTTP upstream's own host
        ("http://203.0.113.10", "http://198.51.100.9/token", False),
    ],
)
def test_credentials_go_to_an_https_realm_or_the_plain_http_upstreams_own_host_only(
    upstream_url: str, realm: str, with_credentials: bool
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, stream=Streamed(json.dumps({"token": "t0k", "expires_in": 300}).encode()))
        if request.headers.get("Authorization") != "Bearer t0k":
            return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'})
        return httpx.Response(200, stream=Streamed(b"{}"), headers={"Content-Type": "application/json"})

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream(upstream_url, username="robot", password="pa55")
        try:
            for repo in ("acme/one", "acme/two"):
                assert (await upstream.get_manifest(repo, "1")).body == b"{}"
        finally:
            await upstream.aclose()

    with structlog.testing.capture_logs() as logs:
        run(work)
    tokens = [r for r in recorded.seen if r.url.path == "/token"]
    assert len(tokens) == 2
    assert all(("Authorization" in r.headers) == with_credentials for r in tokens)
    warnings = [e for e in logs if "gets no credentials" in e["event"]]
    assert len(warnings) == (0 if with_credentials else 1)  # once, not per token request


def test_a_realm_on_an_address_the_upstream_is_not_on_is_never_asked() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        challenge = 'Bearer realm="http://169.254.169.254/latest/meta-data/",service="s"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream(username="robot", password="pa55")
        try:
            with pytest.raises(upstream_module.UpstreamError, match=re.escape("realm 169.254.169.254 refused")):
                await upstream.get_manifest("acme/app", "1")
        finally:
            await upstream.aclose()

    run(work)
    assert recorded.hosts() == {"203.0.113.10"}


# -- 4. a failing upstream is backed off from ----------------------------------------------


def ready_upstream(proxy: Proxy) -> dict[str, Any]:
    (state,) = httpx.get(f"{proxy.url}/readyz", timeout=5).json()["upstreams"]
    return dict(state)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_a_black_holed_upstream_is_not_asked_again_while_backed_off_and_tags_are_served_stale(
    faulty: FaultyRegistry,
) -> None:
    digest, _ = faulty.add_image("acme/app", "latest")
    with (
        mirror(faulty, tag_ttl="0s", timeout="1s", connect_timeout="1s") as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as client,
    ):
        assert client.get("/v2/acme/app/manifests/latest").headers["Docker-Content-Digest"] == digest
        hole = faulty.slow(header_delay=60)  # accepts, reads the request, never answers
        faulty.reset_log()
        for _ in range(8):
            stale = client.get("/v2/acme/app/manifests/latest")
            assert stale.status_code == 200 and stale.headers["Docker-Content-Digest"] == digest
        missing = client.get("/v2/acme/app/manifests/other")
        assert missing.status_code == 503 and oci_error(missing)["code"] == "UNAVAILABLE"
        assert int(missing.headers["Retry-After"]) >= 1
        # One request met the black hole; since then only background probes of /v2/.
        asked = [r.path for r in faulty.requests()]
        assert sum("/manifests/" in path for path in asked) == 1
        assert set(asked) - {"/v2/"} == {"/v2/acme/app/manifests/latest"}
        state = ready_upstream(proxy)
        assert state["state"] == "failing" and state["backoff_until"] is not None

        faulty.remove_fault(hole)
        wait_until(lambda: ready_upstream(proxy)["state"] == "ok")  # a probe got through
        assert ready_upstream(proxy)["backoff_until"] is None
        faulty.reset_log()
        assert client.get("/v2/acme/app/manifests/latest").status_code == 200
        assert faulty.count("HEAD", "/manifests/latest") == 1  # asked again


def test_failed_answers_in_a_row_back_off_too(faulty: FaultyRegistry) -> None:
    digest, _ = faulty.add_image("acme/app", "latest")
    with mirror(faulty, tag_ttl="0s") as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.get("/v2/acme/app/manifests/latest").status_code == 200
        failing = faulty.fail(503)  # probes of /v2/ too
        faulty.reset_log()
        for _ in range(FAILED_ANSWERS_BEFORE_BACKOFF + 5):
            assert client.get("/v2/acme/app/manifests/latest").headers["Docker-Content-Digest"] == digest
        assert faulty.count(None, "/manifests/") == FAILED_ANSWERS_BEFORE_BACKOFF
        faulty.remove_fault(failing)
        wait_until(lambda: ready_upstream(proxy)["state"] == "ok")


def upstream_answering(answer: Callable[[httpx.Request], httpx.Response]) -> tuple[Recorded, Upstream]:
    recorded = Recorded(answer)
    return recorded, recorded.upstream()


def test_not_found_is_no_failure_and_a_success_resets_the_count() -> None:
    statuses = iter([404] * 10 + [503] * (FAILED_ANSWERS_BEFORE_BACKOFF - 1) + [200] + [503])
    recorded = Recorded(lambda request: httpx.Response(next(statuses), headers={"Docker-Content-Digest": DIGEST}))

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            for _ in range(10):
                with pytest.raises(UpstreamNotFound):
                    await upstream.head_manifest("acme/app", "1")
            for _ in range(FAILED_ANSWERS_BEFORE_BACKOFF - 1):
                with pytest.raises(UpstreamUnavailable):
                    await upstream.head_manifest("acme/app", "1")
            assert await upstream.head_manifest("acme/app", "1") == DIGEST
            with pytest.raises(UpstreamUnavailable) as failed:
                await upstream.head_manifest("acme/app", "1")
            assert not isinstance(failed.value, UpstreamBackingOff)
            assert upstream.backoff_until is None
        finally:
            await upstream.aclose()

    run(work)
    assert len(recorded.seen) == 10 + FAILED_ANSWERS_BEFORE_BACKOFF + 1


def test_the_window_doubles_while_probes_fail_honours_retry_after_and_ends_when_one_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_module, "BACKOFF_FIRST", 0.05)
    down = {"yes": True}

    def answer(request: httpx.Request) -> httpx.Response:
        if down["yes"]:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(401 if request.url.path == "/v2/" else 200)

    recorded = Recorded(answer)

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            with pytest.raises(UpstreamUnavailable):
                await upstream.head_blob("acme/app", DIGEST)
            with pytest.raises(UpstreamBackingOff) as refused:
                await upstream.head_blob("acme/app", DIGEST)
            assert refused.value.status == 503 and refused.value.retry_after == "1"
            await _until(lambda: sum(r.url.path == "/v2/" for r in recorded.seen) >= 2)
            assert upstream._windows >= 2  # each failed probe doubled the window
            down["yes"] = False
            await _until(lambda: upstream.backoff_until is None)
            assert upstream.last_ok is not None
            await upstream.head_blob("acme/app", DIGEST)
        finally:
            await upstream.aclose()

    run(work)
    blobs = [r for r in recorded.seen if "/blobs/" in r.url.path]
    assert len(blobs) == 2  # the first, and the one after the probe succeeded


def test_a_rate_limit_backs_off_for_its_retry_after() -> None:
    recorded = Recorded(lambda request: httpx.Response(429, headers={"Retry-After": "30"}))

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            for _ in range(FAILED_ANSWERS_BEFORE_BACKOFF):
                with pytest.raises(UpstreamUnavailable):
                    await upstream.get_manifest("acme/app", "1")
            with pytest.raises(UpstreamBackingOff) as refused:
                await upstream.get_manifest("acme/app", "1")
            assert refused.value.status == 429 and int(refused.value.retry_after or 0) >= 29
        finally:
            await upstream.aclose()

    run(work)
    assert len(recorded.seen) == FAILED_ANSWERS_BEFORE_BACKOFF


def test_readyz_state_and_the_status_page_show_the_backoff() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    recorded = Recorded(refuse)
    states: list[dict[str, object]] = []

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            states.append(upstream_state(upstream))
            with pytest.raises(UpstreamUnavailable):
                await upstream.head_blob("acme/app", DIGEST)
            states.append(upstream_state(upstream))
        finally:
            await upstream.aclose()

    run(work)
    before, during = states
    assert before["state"] == "unknown" and before["backoff_until"] is None
    assert during["state"] == "failing" and isinstance(during["backoff_until"], float)
    assert during["last_error"] == {"at": pytest.approx(time.time(), abs=60), "what": "HEAD blobs: ConnectError"}
    page = status.render(metrics.Snapshot(CollectorRegistry()), [during], Activity(), time.time())
    assert re.search(r"failing</span><br><span class=\"sub\">not asked, next try in [01] s", page)


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_too_large_is_its_own_error() -> None:
    body = json.dumps({"tags": ["x" * 100] * (upstream_module.MAX_TAGS_SIZE // 100)}).encode()
    recorded = Recorded(lambda request: httpx.Response(200, stream=Streamed(body)))  # no Content-Length

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            with pytest.raises(UpstreamTooLarge, match=re.escape("larger than the 8 MiB limit")):
                await upstream.tags("acme/app", None, None)
        finally:
            await upstream.aclose()

    run(work)


@pytest.mark.parametrize(
    ("status", "content_range", "body", "expected"),
    [
        (206, "bytes 10-19/100", bytes(range(10, 20)), (10, 19, 100, bytes(range(10, 20)))),
        (206, "bytes 10-19/100", bytes(range(10, 40)), (10, 19, 100, bytes(range(10, 20)))),  # only the range
        (206, "bytes 0-99/100", bytes(range(100)), (0, 99, 100, bytes(range(100)))),  # the caller checks which
        (200, None, bytes(range(100)), None),  # Range ignored: never passed on as a range
        (206, "bytes 10-19/*", bytes(range(10, 20)), None),  # no size
        (206, "bytes 10-200/100", bytes(range(10, 20)), None),  # past its own end
    ],
)
def test_a_blob_range_is_only_ever_the_range_answered(
    status: int, content_range: str | None, body: bytes, expected: tuple[int, int, int, bytes] | None
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": content_range} if content_range else {}
        return httpx.Response(status, headers=headers, stream=Streamed(body))

    recorded = Recorded(answer)

    async def work() -> tuple[int, int, int, bytes] | None:
        upstream = recorded.upstream()
        try:
            source = await upstream.open_blob_range("acme/app", DIGEST, "bytes=10-19")
            if source is None:
                return None
            try:
                return source.start, source.end, source.size, b"".join([chunk async for chunk in source.chunks])
            finally:
                await source.close()
        finally:
            await upstream.aclose()

    assert asyncio.run(work()) == expected
    assert [r.headers["Range"] for r in recorded.seen] == ["bytes=10-19"]


def test_a_blob_range_that_comes_short_raises_unavailable() -> None:
    recorded = Recorded(
        lambda request: httpx.Response(206, headers={"Content-Range": "bytes 10-19/100"}, stream=Streamed(b"12345"))
    )

    async def work() -> None:
        upstream = recorded.upstream()
        try:
            source = await upstream.open_blob_range("acme/app", DIGEST, "bytes=10-19")
            assert source is not None
            with pytest.raises(UpstreamUnavailable, match="5 of 10"):
                _ = [chunk async for chunk in source.chunks]
            await source.close()
        finally:
            await upstream.aclose()

    asyncio.run(work())


# -- 5. blob bodies off the event loop -----------------------------------------------------


def _partial_file(store: DiskContentStore, digest: str) -> Path:
    return store.partial_dir / f"{digest.replace(':', '-')}.data"


def _download_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("download ")]


def test_a_cold_blob_reaches_the_cache_file_while_the_event_loop_is_busy(
    faulty: FaultyRegistry, tmp_path: Path
) -> None:
    """Receiving, writing and hashing happen on the download's thread: the loop only hands out bytes."""
    data = pseudo_random_bytes("off the loop", 16 * MIB)  # far more than socket buffers and a pending batch hold
    digest = faulty.add_blob(data)
    store = DiskContentStore(tmp_path, max_size=64 * MIB)

    async def work() -> None:
        upstream = Upstream(UpstreamConfig(name="docker.io", url=faulty.url))
        try:
            download = Downloads(store).join(digest, lambda: upstream.open_blob("acme/app", digest))
            reader = DownloadReader(download)
            await download.started
            written = 0
            for _ in range(3000):  # the loop held on purpose (a blocking wait), at most 30 s
                written = _partial_file(store, digest).stat().st_size
                if written == len(data):
                    break
                time.sleep(0.01)
            assert written == len(data), f"{written} of {len(data)} bytes reached the file while the loop was busy"
            body = b""
            while chunk := await reader.read(len(body), 1 << 30):
                body += chunk
            reader.close()
            assert body == data and download.committed
        finally:
            await upstream.aclose()

    asyncio.run(work())
    assert store.has_blob(digest)
    store.close()


def test_a_download_cancelled_midway_stops_its_thread_and_closes_its_connection(
    faulty: FaultyRegistry, tmp_path: Path
) -> None:
    data = pseudo_random_bytes("cancelled", 8 * MIB)
    digest = faulty.add_blob(data)
    faulty.slow(digest=digest, chunk_size=64 << 10, chunk_delay=0.05)
    store = DiskContentStore(tmp_path, max_size=64 * MIB)

    async def work() -> None:
        upstream = Upstream(UpstreamConfig(name="docker.io", url=faulty.url))
        try:
            download = Downloads(store).join(digest, lambda: upstream.open_blob("acme/app", digest))
            await download.started
            for _ in range(1000):
                if _partial_file(store, digest).stat().st_size > 0:
                    break
                await asyncio.sleep(0.01)
            assert download._task is not None
            download._task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await download._task
            for _ in range(1000):  # the thread notices at its next chunk
                if not _download_threads() and faulty.active_connections() == 0:
                    break
                await asyncio.sleep(0.01)
            assert _download_threads() == []
            assert faulty.active_connections() == 0, "the upstream connection of a stopped download is kept open"
        finally:
            await upstream.aclose()

    asyncio.run(work())
    assert os.listdir(store.partial_dir) == []
    assert not store.has_blob(digest)
    store.close()


def _fetch(upstream: Upstream, store: DiskContentStore, digest: str) -> Awaitable[tuple[bytes, BaseException | None]]:
    async def work() -> tuple[bytes, BaseException | None]:
        download = Downloads(store).join(digest, lambda: upstream.open_blob("acme/app", digest))
        reader = DownloadReader(download)
        body = b""
        try:
            await download.started
            while chunk := await reader.read(len(body), 1 << 30):
                body += chunk
        except Exception as exc:
            return body, exc
        finally:
            reader.close()
        return body, None

    return work()


def test_a_large_blob_read_straight_from_its_socket_arrives_whole_and_its_connection_is_not_reused(
    faulty: FaultyRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threaded, "RAW_BODY_MIN", 2 * MIB)
    blobs = [pseudo_random_bytes(f"raw {n}", 4 * MIB + n) for n in range(2)]
    small = [pseudo_random_bytes(f"parsed {n}", MIB + n) for n in range(2)]
    digests = [faulty.add_blob(blob) for blob in blobs]
    small_digests = [faulty.add_blob(blob) for blob in small]
    store = DiskContentStore(tmp_path, max_size=64 * MIB)

    async def work() -> None:
        upstream = Upstream(UpstreamConfig(name="docker.io", url=faulty.url))
        try:
            for blob, digest in zip(blobs, digests, strict=True):
                assert await _fetch(upstream, store, digest) == (blob, None)
            # Each large body left its connection closed: the parser there never saw the body end.
            assert faulty.total_connections() == 2
            for blob, digest in zip(small, small_digests, strict=True):  # small bodies keep the parser and
                assert await _fetch(upstream, store, digest) == (blob, None)  # their connection alive
            assert faulty.total_connections() == 3
        finally:
            await upstream.aclose()

    asyncio.run(work())
    assert all(store.has_blob(digest) for digest in digests)
    store.close()


def test_a_large_blob_cut_short_on_its_socket_fails_and_stores_nothing(
    faulty: FaultyRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threaded, "RAW_BODY_MIN", 2 * MIB)
    data = pseudo_random_bytes("cut short", 8 * MIB)
    digest = faulty.add_blob(data)
    faulty.truncate(digest, keep=5 * MIB)
    store = DiskContentStore(tmp_path, max_size=64 * MIB)

    async def work() -> tuple[bytes, BaseException | None]:
        upstream = Upstream(UpstreamConfig(name="docker.io", url=faulty.url))
        try:
            return await _fetch(upstream, store, digest)
        finally:
            await upstream.aclose()

    body, error = asyncio.run(work())
    assert error is not None and "broke off" in str(error), error
    assert len(body) < 5 * MIB and body == data[: len(body)]
    assert not store.has_blob(digest)
    assert os.listdir(store.partial_dir) == []
    store.close()
