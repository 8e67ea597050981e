"""What the mirror does when the upstream misbehaves: wrong bytes, short bodies, 5xx, 429,
slowness, token challenges, redirects, and being down. Uses the fault-injecting upstream.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy, mirror

TAG_HEAD = re.compile(r"/manifests/(?!sha256:)")


@pytest.fixture
def faulty() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def visible_blob_files(proxy: Proxy) -> list[Path]:
    """Every file a reader of the cache could see (partial downloads are private)."""
    content = proxy.cache_dir / "content"
    return [p for p in content.rglob("*.val")] if content.exists() else []


def logged(proxy: Proxy, text: str, timeout: float = 5.0) -> bool:
    """The access line is written just after the response: give it a moment."""
    deadline = time.monotonic() + timeout
    while text not in proxy.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def get_fully(url: str) -> bytes:
    with httpx.Client(timeout=20) as client:
        response = client.get(url)
        response.raise_for_status()
        return response.content


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_bad_blob_bytes_abort_the_transfer_and_are_not_cached(faulty: FaultyRegistry, fault: str) -> None:
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[3 << 20])
    getattr(faulty, fault)(layer, times=1)
    with mirror(faulty) as proxy:
        url = f"{proxy.url}/v2/acme/app/blobs/{layer}"
        with pytest.raises(httpx.HTTPError):
            get_fully(url)
        assert visible_blob_files(proxy) == []
        # The next request starts afresh, and gets the true bytes.
        assert get_fully(url) == faulty.blob(layer)
        assert faulty.gets(layer) == 2
        assert len(visible_blob_files(proxy)) == 1


def test_corrupt_manifest_is_refused_and_not_cached(faulty: FaultyRegistry) -> None:
    digest, _ = faulty.add_image("acme/app", "1")
    faulty.corrupt(digest, times=1)
    with mirror(faulty) as proxy, httpx.Client(timeout=10) as client:
        refused = client.get(f"{proxy.url}/v2/acme/app/manifests/{digest}")
        assert refused.status_code == 502
        assert refused.json()["errors"][0]["code"] == "UNKNOWN"
        served = client.get(f"{proxy.url}/v2/acme/app/manifests/{digest}")
        assert served.status_code == 200
        assert served.headers["Docker-Content-Digest"] == digest


@pytest.mark.parametrize("status", [500, 503, 429])
def test_tag_is_served_stale_when_the_check_fails(faulty: FaultyRegistry, status: int) -> None:
    digest, _ = faulty.add_image("acme/app", "latest")
    with mirror(faulty, tag_ttl="0s") as proxy, httpx.Client(timeout=10) as client:
        url = f"{proxy.url}/v2/acme/app/manifests/latest"
        assert client.get(url).headers["Docker-Content-Digest"] == digest
        faulty.fail(status, path=TAG_HEAD)
        faulty.fail(status, method="GET", path=TAG_HEAD)
        stale = client.get(url)
        assert stale.status_code == 200
        assert stale.headers["Docker-Content-Digest"] == digest
        assert faulty.count("HEAD", "/manifests/latest") >= 1
        assert logged(proxy, '"cache": "stale"')


def test_tag_check_uses_head_and_follows_a_moved_tag(faulty: FaultyRegistry) -> None:
    first, _ = faulty.add_image("acme/app", "latest", layer_sizes=[100])
    with mirror(faulty, tag_ttl="0s") as proxy, httpx.Client(timeout=10) as client:
        url = f"{proxy.url}/v2/acme/app/manifests/latest"
        assert client.get(url).headers["Docker-Content-Digest"] == first
        faulty.reset_log()
        assert client.get(url).headers["Docker-Content-Digest"] == first
        assert faulty.count("HEAD", "/manifests/latest") == 1
        assert faulty.count("GET", "/manifests/") == 0
        second, _ = faulty.add_image("acme/app", "latest", layer_sizes=[200])
        assert client.get(url).headers["Docker-Content-Digest"] == second


def test_fresh_tag_is_answered_without_asking_upstream(faulty: FaultyRegistry) -> None:
    faulty.add_image("acme/app", "latest")
    with mirror(faulty, tag_ttl="1h") as proxy, httpx.Client(timeout=10) as client:
        url = f"{proxy.url}/v2/acme/app/manifests/latest"
        client.get(url).raise_for_status()
        faulty.reset_log()
        for _ in range(5):
            client.head(url).raise_for_status()
            client.get(url).raise_for_status()
        assert faulty.requests() == []


def test_slow_upstream_streams_first_bytes_before_the_download_ends(faulty: FaultyRegistry) -> None:
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[2 << 20])
    # 32 chunks, 0.15 s apart: the whole transfer takes about 5 s.
    faulty.slow(digest=layer, chunk_size=64 << 10, chunk_delay=0.15)
    with mirror(faulty) as proxy, httpx.Client(timeout=30) as client:
        started = time.monotonic()
        with client.stream("GET", f"{proxy.url}/v2/acme/app/blobs/{layer}") as response:
            chunks = response.iter_raw()
            next(chunks)
            first_byte = time.monotonic() - started
            body = b"".join(chunks)
        total = time.monotonic() - started
    assert first_byte < 2.0 < total
    assert len(body) > 0


def test_concurrent_requests_share_one_upstream_fetch(faulty: FaultyRegistry) -> None:
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[2 << 20])
    faulty.slow(digest=layer, chunk_size=128 << 10, chunk_delay=0.05)
    bodies: list[bytes] = []
    with mirror(faulty) as proxy:

        def pull() -> None:
            bodies.append(get_fully(f"{proxy.url}/v2/acme/app/blobs/{layer}"))

        threads = [threading.Thread(target=pull) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert bodies == [faulty.blob(layer)] * 8
    assert faulty.gets(layer) == 1


def test_bearer_token_challenge_is_answered_once_per_repository(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    digest, blobs = faulty.add_image("acme/app", "1", layer_sizes=[10, 20, 30])
    with mirror(faulty) as proxy, httpx.Client(timeout=10) as client:
        assert client.get(f"{proxy.url}/v2/acme/app/manifests/1").headers["Docker-Content-Digest"] == digest
        for blob in blobs:
            assert client.get(f"{proxy.url}/v2/acme/app/blobs/{blob}").content == faulty.blob(blob)
    tokens = faulty.requests("token")
    assert len(tokens) == 1
    assert "scope=repository%3Aacme%2Fapp%3Apull" in tokens[0].query or "repository:acme/app:pull" in tokens[0].query


def test_expired_token_is_refreshed_once(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    _, blobs = faulty.add_image("acme/app", "1", layer_sizes=[10, 20])
    with mirror(faulty) as proxy, httpx.Client(timeout=10) as client:
        assert client.get(f"{proxy.url}/v2/acme/app/blobs/{blobs[0]}").status_code == 200
        faulty.invalidate_tokens()
        assert client.get(f"{proxy.url}/v2/acme/app/blobs/{blobs[1]}").content == faulty.blob(blobs[1])
    assert len(faulty.requests("token")) == 2


def test_token_service_with_credentials(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    faulty.token_credentials = ("robot", "pa55")
    digest, _ = faulty.add_image("acme/private", "1")
    with mirror(faulty, username="robot", password="pa55") as proxy, httpx.Client(timeout=10) as client:
        answer = client.get(f"{proxy.url}/v2/acme/private/manifests/1")
        assert answer.headers["Docker-Content-Digest"] == digest
        assert "pa55" not in proxy.log_text()


def test_basic_auth_upstream(faulty: FaultyRegistry) -> None:
    faulty.auth = "basic"
    faulty.credentials = ("robot", "pa55")
    digest, _ = faulty.add_image("acme/private", "1")
    with mirror(faulty, username="robot", password="pa55") as proxy, httpx.Client(timeout=10) as client:
        assert client.get(f"{proxy.url}/v2/acme/private/manifests/1").headers["Docker-Content-Digest"] == digest


def test_wrong_upstream_credentials_never_leak_into_the_answer(faulty: FaultyRegistry) -> None:
    faulty.auth = "basic"
    faulty.credentials = ("robot", "right")
    faulty.add_image("acme/private", "1")
    with mirror(faulty, username="robot", password="wrong-pa55") as proxy, httpx.Client(timeout=10) as client:
        answer = client.get(f"{proxy.url}/v2/acme/private/manifests/1")
        assert answer.status_code == 404
        assert "wrong-pa55" not in answer.text
        assert "wrong-pa55" not in proxy.log_text()


def test_blob_redirect_is_followed_without_the_registry_authorization(faulty: FaultyRegistry) -> None:
    faulty.auth = "bearer"
    faulty.redirect_blobs = True
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[1 << 20])
    with mirror(faulty) as proxy:
        assert get_fully(f"{proxy.url}/v2/acme/app/blobs/{layer}") == faulty.blob(layer)
    assert faulty.cdn_authorization_headers() == []


def test_cached_content_is_served_while_upstream_is_down(faulty: FaultyRegistry) -> None:
    digest, blobs = faulty.add_image("acme/app", "latest", layer_sizes=[1000])
    with mirror(faulty, tag_ttl="0s") as proxy, httpx.Client(timeout=10) as client:
        client.get(f"{proxy.url}/v2/acme/app/manifests/latest").raise_for_status()
        for blob in blobs:
            client.get(f"{proxy.url}/v2/acme/app/blobs/{blob}").raise_for_status()
        faulty.stop()
        proxy.stop()
        proxy.start()  # starts with the upstream unreachable
        assert client.get(f"{proxy.url}/v2/").status_code == 200
        assert client.get(f"{proxy.url}/v2/acme/app/manifests/latest").headers["Docker-Content-Digest"] == digest
        for blob in blobs:
            assert client.get(f"{proxy.url}/v2/acme/app/blobs/{blob}").status_code == 200
        missing = client.get(f"{proxy.url}/v2/acme/app/manifests/other")
        assert missing.status_code == 503
        assert missing.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_upstream_429_on_uncached_content_is_passed_on_with_retry_after(faulty: FaultyRegistry) -> None:
    faulty.add_image("acme/app", "1")
    faulty.fail(429, retry_after=7)
    with mirror(faulty) as proxy, httpx.Client(timeout=10) as client:
        answer = client.get(f"{proxy.url}/v2/acme/app/manifests/1")
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "7"
        assert answer.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_first_client_leaving_does_not_stop_the_download(faulty: FaultyRegistry) -> None:
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[2 << 20])
    faulty.slow(digest=layer, chunk_size=128 << 10, chunk_delay=0.05)
    with mirror(faulty) as proxy:
        url = f"{proxy.url}/v2/acme/app/blobs/{layer}"
        with httpx.Client(timeout=10) as client, client.stream("GET", url) as response:
            next(response.iter_raw())  # read a little, then hang up
        deadline = time.monotonic() + 20
        while not visible_blob_files(proxy) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(visible_blob_files(proxy)) == 1
        assert get_fully(url) == faulty.blob(layer)
    assert faulty.gets(layer) == 1


def test_range_ahead_of_a_download_is_asked_of_the_upstream_while_the_one_download_goes_on(
    faulty: FaultyRegistry,
) -> None:
    _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[2 << 20])
    faulty.slow(digest=layer, chunk_size=64 << 10, chunk_delay=0.2)  # byte 1000000 comes after about 3 s
    expected = faulty.blob(layer)
    with mirror(faulty) as proxy, httpx.Client(timeout=30) as client:
        url = f"{proxy.url}/v2/acme/app/blobs/{layer}"
        with client.stream("GET", url) as whole:
            chunks = whole.iter_raw()
            first = next(chunks)
            faulty.reset_log()
            ranged = client.get(url, headers={"Range": "bytes=1000000-1000099"})
            asked = [r.headers.get("range") for r in faulty.requests() if layer in r.path and r.method == "GET"]
            rest = b"".join(chunks)
        assert first + rest == expected
        assert ranged.status_code == 206
        assert ranged.content == expected[1000000:1000100]
        assert ranged.headers["Content-Range"] == f"bytes 1000000-1000099/{len(expected)}"
        assert asked == ["bytes=1000000-1000099"]  # one range request, no second full download
        assert len(visible_blob_files(proxy)) == 1  # the full download was stored
