"""`[storage] backend = "s3"`: replicas (`python -m proxy serve`) sharing a SeaweedFS bucket and a Redis index."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.faulty import OCI_MANIFEST, FaultyRegistry
from tests.support.proxy import Proxy
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedFS


@pytest.fixture(scope="module")
def weed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def upstream() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def replica(upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer, **storage: Any) -> Proxy:
    """A replica with an empty local directory of its own, on the shared bucket and Redis."""
    return Proxy(
        {
            "cache": {"local_max_size": "256MiB"},
            "upstream": [{"name": "docker.io", "url": upstream.url, "default": True}],
            "storage": {
                "backend": "s3",
                "endpoint": weed.endpoint,
                "bucket": weed.bucket,
                "access_key_env": "PULLPROXY_S3_ACCESS_KEY",
                "secret_key_env": "PULLPROXY_S3_SECRET_KEY",
                **storage,
            },
            "coordination": {"redis": redis_server.url},
        },
        env=weed.environment(),
    )


def pull(proxy: Proxy, name: str, reference: str, digests: list[str]) -> dict[str, bytes]:
    """The manifest and the blobs of an image through `proxy`, each checked to be served whole."""
    got: dict[str, bytes] = {}
    manifest = httpx.get(f"{proxy.url}/v2/{name}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}, timeout=30)
    assert manifest.status_code == 200, manifest.text
    got[manifest.headers["Docker-Content-Digest"]] = manifest.content
    for digest in digests:
        answer = httpx.get(f"{proxy.url}/v2/{name}/blobs/{digest}", timeout=30)
        assert answer.status_code == 200, answer.text
        got[digest] = answer.content
    return got


def test_a_second_replica_with_an_empty_local_tier_serves_what_the_first_pulled_without_the_upstream(
    upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer
) -> None:
    manifest, blobs = upstream.add_image("acme/shared", "1", layer_sizes=[1 << 20, 300 << 10])
    with replica(upstream, weed, redis_server) as first:
        pulled = pull(first, "acme/shared", "1", blobs)
    assert all(pulled[d] == upstream.blob(d) for d in blobs)
    assert [upstream.gets(d) for d in [manifest, *blobs]] == [1, 1, 1, 1]
    with replica(upstream, weed, redis_server) as second:
        assert pull(second, "acme/shared", manifest, blobs) == pulled
        assert list(second.cache_dir.glob("content/**/*.val"))  # served from its own local tier now
    assert [upstream.gets(d) for d in [manifest, *blobs]] == [1, 1, 1, 1]  # no second upstream GET


def test_with_the_bucket_down_the_local_tier_serves_and_the_rest_is_503_until_it_is_back(
    upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer
) -> None:
    manifest, blobs = upstream.add_image("acme/outage", "1", layer_sizes=[200 << 10])
    later, later_blobs = upstream.add_image("acme/later", "1", layer_sizes=[100 << 10])
    with replica(upstream, weed, redis_server) as local, replica(upstream, weed, redis_server) as cold:
        pulled = pull(local, "acme/outage", manifest, blobs)
        weed.kill()
        try:
            assert pull(local, "acme/outage", manifest, blobs) == pulled  # its local copies
            for proxy, name, digest in [(cold, "acme/outage", blobs[1]), (local, "acme/later", later_blobs[1])]:
                answer = httpx.get(f"{proxy.url}/v2/{name}/blobs/{digest}", timeout=30)
                assert answer.status_code == 503, answer.text
                assert answer.json()["errors"][0]["code"] == "UNAVAILABLE"
            answer = httpx.get(f"{local.url}/v2/acme/later/manifests/{later}", timeout=30)
            assert answer.status_code == 503 and answer.json()["errors"][0]["code"] == "UNAVAILABLE"
        finally:
            weed.start()
        assert pull(cold, "acme/outage", manifest, blobs) == pulled  # nothing was lost
        assert pull(local, "acme/later", later, later_blobs)[later_blobs[1]] == upstream.blob(later_blobs[1])
        assert "Traceback" not in local.log_text() + cold.log_text()
    assert upstream.gets(blobs[1]) == 1


def test_with_redis_down_blobs_and_manifests_by_digest_still_serve(
    upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer
) -> None:
    manifest, blobs = upstream.add_image("acme/indexless", "1", layer_sizes=[150 << 10])
    with replica(upstream, weed, redis_server) as first:
        pulled = pull(first, "acme/indexless", "1", blobs)
    redis_server.stop()
    try:
        with replica(upstream, weed, redis_server) as second:
            assert pull(second, "acme/indexless", manifest, blobs) == pulled
    finally:
        redis_server.start()
    assert [upstream.gets(d) for d in [manifest, *blobs]] == [1, 1, 1]


def test_redirect_answers_a_cached_blob_with_a_presigned_url_that_serves_it_and_ranges(
    upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer
) -> None:
    _, blobs = upstream.add_image("acme/redirected", "1", layer_sizes=[64 << 10])
    layer = blobs[1]
    with replica(upstream, weed, redis_server, redirect=True) as proxy:
        url = f"{proxy.url}/v2/acme/redirected/blobs/{layer}"
        first = httpx.get(url, timeout=30)  # not in the bucket yet: served, and stored
        assert first.status_code == 200 and first.content == upstream.blob(layer)
        answer = httpx.get(url, timeout=30)
        assert answer.status_code == 307 and answer.headers["Docker-Content-Digest"] == layer
        location = answer.headers["Location"]
        assert location.startswith(weed.endpoint) and "X-Amz-Expires=300" in location
        assert "max-age" not in answer.headers.get("Cache-Control", "")
        assert httpx.get(location, timeout=30).content == upstream.blob(layer)
        ranged = httpx.get(url, headers={"Range": "bytes=100-199"}, follow_redirects=True, timeout=30)
        assert (ranged.status_code, ranged.content) == (206, upstream.blob(layer)[100:200])
        head = httpx.head(url, timeout=30)  # HEAD is answered here
        assert head.status_code == 200 and head.headers["Content-Length"] == str(64 << 10)
    assert upstream.gets(layer) == 1
