"""Hosted repositories across two `python -m proxy serve` replicas sharing a real redis-server and SeaweedFS.

An upload is staged on the replica that took its POST; its later requests reach whichever
replica a load balancer picks and are forwarded to the one staging it. The replicas here keep
their uploads apart (each its own cache directory) and share the hosted content through the
bucket (`hosted/` objects).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest

from cache.bucket import open_bucket
from proxy.fleet import peers
from proxy.units import format_size
from tests.proxy.hosted.test_push_api import EMPTY_CONFIG, image_manifest, sha
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import REPO_ROOT, Proxy, to_toml
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedFS

SECRET_ENV = "PP_TEST_PEER_SECRET"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def storage(weed: SeaweedFS) -> dict[str, str]:
    """The `[storage]` table for the bucket (its secrets in `weed.environment()`)."""
    return {
        "backend": "s3",
        "endpoint": weed.endpoint,
        "bucket": weed.bucket,
        "access_key_env": "PULLPROXY_S3_ACCESS_KEY",
        "secret_key_env": "PULLPROXY_S3_SECRET_KEY",
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


Replicas = Callable[..., tuple[Proxy, Proxy]]


@pytest.fixture
def replicas(
    redis_server: RedisServer, weed: SeaweedFS, upstream: FaultyRegistry, tmp_path: Path
) -> Iterator[Replicas]:
    """Replicas A and B on one Redis (emptied first) and one bucket; `hosted` keys; `secret=False`: no peer secret."""
    made: list[Proxy] = []

    def make(secret: bool = True, **hosted: Any) -> tuple[Proxy, Proxy]:
        import redis

        redis.Redis.from_url(redis_server.url).flushdb()
        coordination: dict[str, Any] = {"redis": redis_server.url}
        if secret:
            coordination["peer_secret_env"] = SECRET_ENV
        config = {
            "hosted": {"repositories": ["acme/**"], **hosted},
            "coordination": coordination,
            "storage": storage(weed),
        }
        env = {SECRET_ENV: "a secret the replicas share", **weed.environment()}
        pair = []
        for name in ("a", "b"):
            proxy = Proxy(config, upstream_url=upstream.url, env=env, workdir=tmp_path / name)
            made.append(proxy)
            pair.append(proxy)
        return pair[0], pair[1]

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


def staged(proxy: Proxy) -> list[str]:
    folder = proxy.cache_dir / "hosted" / "uploads"
    return sorted(entry.name for entry in folder.iterdir()) if folder.exists() else []


def test_a_chunked_push_started_on_a_patched_on_b_and_put_on_a_lands_and_pulls_through_both(
    replicas: Replicas, weed: SeaweedFS
) -> None:
    a, b = replicas()
    layer = os.urandom(300_000)
    with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
        started = on_a.post("/v2/acme/app/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["Location"]
        upload = started.headers["Docker-Upload-UUID"]
        first = on_b.patch(
            location,
            content=layer[:100_000],
            headers={"Content-Range": "0-99999", "Content-Type": "application/octet-stream"},
        )
        assert first.status_code == 202, first.text
        assert (first.headers["Range"], first.headers["Docker-Upload-UUID"]) == ("0-99999", upload)
        assert staged(a) == [upload] and staged(b) == []  # B forwarded it; A stages it
        assert (a.cache_dir / "hosted" / "uploads" / upload).stat().st_size == 100_000
        status = on_b.get(first.headers["Location"])
        assert (status.status_code, status.headers["Range"]) == (204, "0-99999")
        out_of_order = on_b.patch(location, content=b"x", headers={"Content-Range": "5-5"})
        assert out_of_order.status_code == 416  # A's answer, as it is
        second = on_b.patch(
            location, content=iter([layer[100_000:200_000]]), headers={"Content-Range": "100000-199999"}
        )
        assert second.status_code == 202 and second.headers["Range"] == "0-199999"
        done = on_a.put(location, params={"digest": sha(layer)}, content=layer[200_000:])
        assert done.status_code == 201, done.text
        assert done.headers["Docker-Content-Digest"] == sha(layer)
        assert (
            on_b.post(
                "/v2/acme/app/blobs/uploads/", params={"digest": sha(EMPTY_CONFIG)}, content=EMPTY_CONFIG
            ).status_code
            == 201
        )
        manifest = image_manifest(layer)
        pushed = on_b.put("/v2/acme/app/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert pushed.status_code == 201, pushed.text
        for client in (on_a, on_b):
            assert client.get(f"/v2/acme/app/blobs/{sha(layer)}").content == layer
            assert client.get("/v2/acme/app/manifests/v1").content == manifest
            assert client.get("/v2/acme/app/tags/list").json()["tags"] == ["v1"]
    assert staged(a) == [] and staged(b) == []
    bucket = open_bucket(weed.endpoint, weed.bucket, "us-east-1", weed.access_key, weed.secret_key)
    assert obstore.head(bucket, "hosted/blobs/sha256/" + sha(layer).removeprefix("sha256:"))["size"] == len(layer)


def test_a_put_forwarded_with_the_whole_blob_and_a_delete_forwarded_cancel_the_upload(replicas: Replicas) -> None:
    a, b = replicas()
    with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        done = on_b.put(location, params={"digest": sha(b"whole")}, content=b"whole")
        assert (done.status_code, done.headers["Docker-Content-Digest"]) == (201, sha(b"whole"))
        assert on_a.get(f"/v2/acme/app/blobs/{sha(b'whole')}").content == b"whole"
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        wrong = on_b.put(location, params={"digest": sha(b"other")}, content=b"not other")
        assert wrong.status_code == 400 and wrong.json()["errors"][0]["code"] == "DIGEST_INVALID"
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        assert on_b.delete(location).status_code == 204
        gone = on_a.patch(location, content=b"late")
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert staged(a) == []


def test_a_forwarded_request_needs_a_valid_credential_for_its_method_and_path(replicas: Replicas) -> None:
    a, _ = replicas()
    replica = peers.Replica("test", "http://127.0.0.1:1")
    good = peers.PeerCredentials("a secret the replicas share", replica)
    with httpx.Client(base_url=a.url, timeout=60) as on_a:
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        forged = peers.PeerCredentials("another secret", replica).issue("PATCH", location)
        for credential in ("junk", forged, good.issue("PATCH", location + "x"), good.issue("DELETE", location)):
            refused = on_a.patch(location, content=b"x", headers={peers.HEADER: credential})
            assert refused.status_code == 403, refused.text
            assert refused.json()["errors"][0]["code"] == "DENIED"
        accepted = on_a.patch(location, content=b"x", headers={peers.HEADER: good.issue("PATCH", location)})
        assert accepted.status_code == 202
    assert [os.path.getsize(a.cache_dir / "hosted" / "uploads" / name) for name in staged(a)] == [1]


def test_the_replica_a_request_reaches_checks_access_before_forwarding(
    redis_server: RedisServer, upstream: FaultyRegistry, tmp_path: Path
) -> None:
    import redis

    from tests.support.auth import user_entry

    redis.Redis.from_url(redis_server.url).flushdb()
    config = {
        "hosted": {"repositories": ["acme/**"]},
        "coordination": {"redis": redis_server.url, "peer_secret_env": SECRET_ENV},
        "auth": {"user": [user_entry(("dev", "pw")), user_entry(("reader", "pw"))]},
        "access": [{"repository": "acme/**", "pull": "anyone", "push": ["dev"]}],
    }
    env = {SECRET_ENV: "s"}
    with (
        Proxy(config, upstream_url=upstream.url, env=env, workdir=tmp_path / "a") as a,
        Proxy(config, upstream_url=upstream.url, env=env, workdir=tmp_path / "b") as b,
    ):
        location = httpx.post(f"{a.url}/v2/acme/app/blobs/uploads/", auth=("dev", "pw")).headers["Location"]
        assert httpx.patch(f"{b.url}{location}", content=b"x").status_code == 401
        assert httpx.patch(f"{b.url}{location}", content=b"x", auth=("reader", "pw")).status_code == 403
        assert httpx.patch(f"{b.url}{location}", content=b"x", auth=("dev", "pw")).status_code == 202
        assert [os.path.getsize(a.cache_dir / "hosted" / "uploads" / n) for n in staged(a)] == [1]


def test_without_a_peer_secret_an_upload_on_another_replica_is_503_and_kept(replicas: Replicas) -> None:
    a, b = replicas(secret=False)
    with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        refused = on_b.patch(location, content=b"x")
        assert refused.status_code == 503 and "peer_secret" in refused.text
        assert on_a.patch(location, content=b"x").status_code == 202
    assert "no [coordination] peer_secret" in b.log_text()  # said at start, once per process


def test_quotas_count_what_both_replicas_hold(replicas: Replicas) -> None:
    a, b = replicas(max_size="250KiB", max_repositories=2, max_manifests_per_repository=1)
    first, second = os.urandom(100_000), os.urandom(100_000)
    with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
        assert on_a.post("/v2/acme/app/blobs/uploads/", params={"digest": sha(first)}, content=first).status_code == 201
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        assert on_a.patch(location, content=second).status_code == 202  # in progress, on A: counts on B too
        refused = on_b.post("/v2/acme/app/blobs/uploads/", params={"digest": sha(b"y" * 60_000)}, content=b"y" * 60_000)
        assert refused.status_code == 403, refused.text
        error = refused.json()["errors"][0]
        assert (error["code"], error["detail"]["quota"]) == ("DENIED", "max_size")
        assert error["detail"]["use"] >= 200_000
        assert on_b.delete(location).status_code == 204  # forwarded to A: its bytes no longer count
        assert (
            on_b.post(
                "/v2/acme/app/blobs/uploads/", params={"digest": sha(b"y" * 60_000)}, content=b"y" * 60_000
            ).status_code
            == 201
        )
        assert on_a.post("/v2/acme/two/blobs/uploads/", params={"digest": sha(b"2")}, content=b"2").status_code == 201
        third = on_b.post("/v2/acme/three/blobs/uploads/", params={"digest": sha(b"z")}, content=b"z")
        assert third.status_code == 403 and third.json()["errors"][0]["detail"]["quota"] == "max_repositories"
        assert (
            on_a.post(
                "/v2/acme/app/blobs/uploads/", params={"digest": sha(EMPTY_CONFIG)}, content=EMPTY_CONFIG
            ).status_code
            == 201
        )
        headers = {"Content-Type": OCI_MANIFEST}
        assert on_a.put("/v2/acme/app/manifests/v1", content=image_manifest(first), headers=headers).status_code == 201
        another = on_b.put(
            "/v2/acme/app/manifests/v2", content=image_manifest(first, annotations={"x": "y"}), headers=headers
        )
        assert another.status_code == 403
        assert another.json()["errors"][0]["detail"]["quota"] == "max_manifests_per_repository"


def test_an_expired_upload_is_dropped_by_gc_run_from_another_replica(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = replicas(upload_ttl="2s")
    with httpx.Client(base_url=a.url, timeout=60) as on_a:
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        assert on_a.patch(location, content=b"partial").status_code == 202
        time.sleep(2.5)
        config = b.dir / "gc.toml"
        config.write_text(to_toml(b.config))
        argv = [sys.executable, "-m", "proxy", "gc", "--config", str(config)]
        env = {**os.environ, **b.env, "PYTHONPATH": str(REPO_ROOT)}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=True).stdout
        assert "1 expired uploads" in out
        gone = on_a.patch(location, content=b"more")
        assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_redis_stopped_a_push_is_503_and_works_again_once_it_is_back(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, _ = replicas()
    with httpx.Client(base_url=a.url, timeout=60) as on_a:
        redis_server.stop()
        try:
            refused = on_a.post("/v2/acme/app/blobs/uploads/", params={"digest": sha(b"x")}, content=b"x")
            assert refused.status_code == 503, refused.text
            assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"
        finally:
            redis_server.start()
        assert on_a.post("/v2/acme/app/blobs/uploads/", params={"digest": sha(b"x")}, content=b"x").status_code == 201


def test_cache_du_and_ls_from_another_replica_show_the_fleets_hosted_content(replicas: Replicas) -> None:
    a, b = replicas()
    layer = os.urandom(150_000)
    with httpx.Client(base_url=a.url, timeout=60) as on_a:
        for blob in (EMPTY_CONFIG, layer):
            assert (
                on_a.post("/v2/acme/app/blobs/uploads/", params={"digest": sha(blob)}, content=blob).status_code == 201
            )
        headers = {"Content-Type": OCI_MANIFEST}
        assert on_a.put("/v2/acme/app/manifests/v1", content=image_manifest(layer), headers=headers).status_code == 201
    config = b.dir / "tools.toml"
    config.write_text(to_toml(b.config))
    env = {**os.environ, **b.env, "PYTHONPATH": str(REPO_ROOT)}

    def run(*args: str) -> str:
        argv = [sys.executable, "-m", "proxy", *args, "--config", str(config)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=True).stdout

    line = next(line for line in run("cache", "du").splitlines() if line.startswith("hosted"))
    held = len(EMPTY_CONFIG) + len(layer) + len(image_manifest(layer))  # pushed through A
    assert line.startswith(f"hosted      {format_size(held)} of"), line
    assert "acme/app:v1" in run("cache", "ls")


def test_a_forwarded_patch_over_the_quota_gets_the_owners_403_and_keeps_the_upload_as_it_was(
    replicas: Replicas,
) -> None:
    a, b = replicas(max_size="1MiB")
    with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
        location = on_a.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        assert on_b.patch(location, content=b"k" * 1000).status_code == 202
        chunks = (b"x" * 65536 for _ in range(64))  # 4 MiB, refused part way by A
        refused = on_b.patch(location, content=chunks, headers={"Content-Range": "1000-4195303"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["errors"][0]["detail"]["quota"] == "max_size"
        status = on_b.get(location)
        assert (status.status_code, status.headers["Range"]) == (204, "0-999")
