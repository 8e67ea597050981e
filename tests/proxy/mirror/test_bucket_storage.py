"""`[storage] backend = "s3"`: replicas (`python -m proxy serve`) sharing a SeaweedFS bucket and a Redis index."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import obstore
import pytest
from obstore.store import S3Store

from cache.bucket import open_bucket
from tests.support.commands import pullproxy
from tests.support.faulty import OCI_MANIFEST, FaultyRegistry
from tests.support.proxy import Proxy
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedFS


@pytest.fixture
def upstream() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def replica(
    upstream: FaultyRegistry,
    weed: SeaweedFS,
    redis_server: RedisServer,
    access: Any = (),
    args: tuple[str, ...] = (),
    pins: tuple[str, ...] = (),
    **storage: Any,
) -> Proxy:
    """A replica with an empty local directory of its own, on the shared bucket and Redis."""
    return Proxy(
        {
            "access": list(access) or None,
            "pin": [{"image": image} for image in pins] or None,
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
        args=args,
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


def test_workers_of_one_replica_share_one_download_and_one_upload(
    upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer
) -> None:
    _, blobs = upstream.add_image("acme/workers", "1", layer_sizes=[2 << 20])
    layer = blobs[1]
    upstream.slow(digest=layer, chunk_size=128 << 10, chunk_delay=0.03)
    bodies: list[bytes] = []
    with replica(upstream, weed, redis_server, args=("--workers", "2")) as proxy:

        def get() -> None:
            bodies.append(httpx.get(f"{proxy.url}/v2/acme/workers/blobs/{layer}", timeout=60).content)

        threads = [threading.Thread(target=get) for _ in range(8)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join(60)
        scraped = httpx.get(f"{proxy.url}/metrics", timeout=30).text
    assert bodies == [upstream.blob(layer)] * 8
    assert upstream.gets(layer) == 1
    # One upload of the layer (a manifest-less pull: the layer alone), whichever worker fetched it.
    assert _sample(scraped, 'pullproxy_object_store_request_duration_seconds_count{operation="put"}') == 1


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
            scraped = httpx.get(f"{local.url}/metrics", timeout=30).text
            assert _sample(scraped, 'pullproxy_object_store_request_duration_seconds_count{operation="put"}') >= 3
            assert _sample(scraped, 'pullproxy_object_store_errors_total{operation="head"}') >= 1
        finally:
            _restart(weed, f"cache/manifests/sha256/{manifest[7:]}")
        assert pull(cold, "acme/outage", manifest, blobs) == pulled  # nothing was lost
        assert pull(local, "acme/later", later, later_blobs)[later_blobs[1]] == upstream.blob(later_blobs[1])
        assert "Traceback" not in local.log_text() + cold.log_text()
    assert upstream.gets(blobs[1]) == 1


def _restart(weed: SeaweedFS, readable: str) -> None:
    """Start the bucket again and wait until an object stored before reads back: a restarted SeaweedFS
    answers 500 to reads for a moment after it takes writes again."""
    weed.start()
    bucket = _bucket(weed)
    for _ in range(100):
        try:
            obstore.get(bucket, readable).bytes()
            return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"{readable} did not read back after the restart")


def _sample(scraped: str, series: str) -> float:
    """The value of one series in a Prometheus text scrape (0 when absent)."""
    for line in scraped.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


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
    private = {"repository": "docker.io/acme/private", "pull": [], "networks": ["10.0.0.0/8"]}
    with replica(upstream, weed, redis_server, access=[private], redirect=True) as proxy:
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
        refused = httpx.get(f"{proxy.url}/v2/acme/private/blobs/{layer}", timeout=30)  # the same blob
        assert refused.status_code in (401, 403) and "Location" not in refused.headers
        head = httpx.head(url, timeout=30)  # HEAD is answered here
        assert head.status_code == 200 and head.headers["Content-Length"] == str(64 << 10)
    assert upstream.gets(layer) == 1


def _bucket(weed: SeaweedFS) -> S3Store:
    return open_bucket(weed.endpoint, weed.bucket, "us-east-1", weed.access_key, weed.secret_key)


def test_the_cache_commands_work_from_any_replica(upstream: FaultyRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    with contextlib.ExitStack() as stack:
        weed = stack.enter_context(SeaweedFS())  # of its own, with its Redis: the counts are this test's
        redis_server = stack.enter_context(RedisServer())
        for name, value in weed.environment().items():
            monkeypatch.setenv(name, value)
        manifest, blobs = upstream.add_image("acme/tools", "1", layer_sizes=[120 << 10])
        config, layer = blobs
        first = stack.enter_context(replica(upstream, weed, redis_server))
        pull(first, "acme/tools", "1", blobs)
        with replica(upstream, weed, redis_server) as other:  # another replica, with an empty local tier
            du = pullproxy(other, "cache", "du").stdout.splitlines()
            assert du[1].split()[-2:] == ["in", "2"] and du[2].split()[-2:] == ["in", "1"]  # the bucket's
            assert pullproxy(other, "cache", "verify").returncode == 0
        # An object that no longer hashes to its digest is found and removed by any replica.
        key = f"cache/blobs/sha256/{layer.removeprefix('sha256:')}"
        obstore.put(_bucket(weed), key, bytes(120 << 10))
        with replica(upstream, weed, redis_server) as fresh:
            verified = pullproxy(fresh, "cache", "verify", check=False)
            assert verified.returncode == 1 and f"removed corrupt {layer}" in verified.stdout
        with pytest.raises(FileNotFoundError):
            obstore.head(_bucket(weed), key)
        # Tags are the fleet's too (in Redis): another replica lists the image and removes it for all.
        with replica(upstream, weed, redis_server) as other:
            assert pullproxy(other, "cache", "ls").stdout.count("docker.io/acme/tools:1") == 1
            removed = pullproxy(other, "cache", "rm", "acme/tools:1").stdout
            assert removed.startswith("removed docker.io/acme/tools:1")
        for path in (f"cache/manifests/sha256/{manifest[7:]}", f"cache/blobs/sha256/{config[7:]}"):
            with pytest.raises(FileNotFoundError):
                obstore.head(_bucket(weed), path)
        with replica(upstream, weed, redis_server) as other:
            du = pullproxy(other, "cache", "du").stdout.splitlines()
            assert du[1].split()[-2:] == ["in", "0"] and du[2].split()[-2:] == ["in", "0"]
            # The bucket down: a command says so in one line, and removes nothing.
            kept_manifest, kept = upstream.add_image("acme/kept", "1", layer_sizes=[10 << 10])
            pull(first, "acme/kept", "1", kept)
            weed.kill()
            failed = pullproxy(other, "cache", "verify", check=False)
            assert failed.returncode == 1 and "object store is unreachable" in failed.stderr
            assert "Traceback" not in failed.stderr
            _restart(weed, f"cache/manifests/sha256/{kept_manifest[7:]}")
            assert pullproxy(other, "cache", "verify").returncode == 0
            assert pullproxy(other, "cache", "du").stdout.splitlines()[1].split()[-2:] == ["in", "2"]


def test_pins_set_by_one_replica_keep_the_content_in_the_bucket_for_all(
    upstream: FaultyRegistry, weed: SeaweedFS, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in weed.environment().items():
        monkeypatch.setenv(name, value)
    manifest, blobs = upstream.add_image("acme/pinned", "1", layer_sizes=[30 << 10])
    pinner = replica(upstream, weed, redis_server, pins=("docker.io/acme/pinned:1",))
    with pinner, replica(upstream, weed, redis_server) as other:
        pullproxy(pinner, "prefetch")
        entries = {line.split()[0]: line for line in pullproxy(other, "cache", "du").stdout.splitlines()}
        assert entries["pinned"].split()[-2:] == ["in", "3"]
        assert pull(other, "acme/pinned", manifest, blobs)[blobs[1]] == upstream.blob(blobs[1])
    assert upstream.gets(blobs[1]) == 1  # fetched by the prefetch, served to the other from the bucket
