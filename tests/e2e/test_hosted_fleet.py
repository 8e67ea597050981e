"""skopeo pushing into one replica of a fleet (SeaweedFS + redis-server) and pulling back out through another."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_clients import assert_same_image
from tests.e2e.test_hosted_clients import _peak_rss
from tests.proxy.hosted.test_fleet import SECRET_ENV, storage
from tests.support.clients import skopeo_copy
from tests.support.images import PushedImage
from tests.support.proxy import Proxy
from tests.support.redis_server import RedisServer
from tests.support.registry import Registry
from tests.support.seaweed import SeaweedFS


@pytest.fixture
def weed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_skopeo_copy_into_replica_a_pulls_back_byte_for_byte_through_replica_b(
    upstream: Registry,
    proxy_factory: Callable[..., Proxy],
    weed: SeaweedFS,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    config = {
        "hosted": {"repositories": ["acme/**"]},
        "coordination": {"redis": redis_server.url, "peer_secret_env": SECRET_ENV},
        "storage": storage(weed),
    }
    env = {SECRET_ENV: "fleet secret", **weed.environment()}
    a = proxy_factory(config, upstream_url=upstream.url, env=env)
    b = proxy_factory(config, upstream_url=upstream.url, env=env)
    kinds = {"alpine": False, "multi": True, "helm": False}
    for kind, all_platforms in kinds.items():
        image = images[kind]
        skopeo_copy(
            f"docker://{upstream.host}/{image.repo}:{image.tag}",
            f"docker://{a.host}/acme/{kind}:{image.tag}",
            all=all_platforms,
            timeout=300,
        )
    for kind, all_platforms in kinds.items():
        image = images[kind]
        folder = tmp_path / kind
        skopeo_copy(f"docker://{b.host}/acme/{kind}:{image.tag}", f"dir:{folder}", all=all_platforms, timeout=300)
        assert_same_image(folder, image, all_platforms)
    assert "PUT" not in b.log_text()  # every push went to A; B served from the bucket and Redis
    assert sorted(httpx.get(f"{b.url}/v2/_catalog").json()["repositories"]) == [f"acme/{k}" for k in sorted(kinds)]


def test_a_large_patch_forwarded_to_the_staging_replica_streams_with_flat_memory_on_both(
    proxy_factory: Callable[..., Proxy], weed: SeaweedFS, redis_server: RedisServer
) -> None:
    """128 MiB in one PATCH through replica B to A (which staged the upload), completed through B, read back."""
    config = {
        "hosted": {"repositories": ["acme/**"]},
        "coordination": {"redis": redis_server.url, "peer_secret_env": SECRET_ENV},
        "storage": storage(weed),
    }
    env = {SECRET_ENV: "fleet secret", **weed.environment()}
    a = proxy_factory(config, env=env)
    b = proxy_factory(config, env=env)
    assert a.pid is not None and b.pid is not None
    piece = os.urandom(4 << 20)
    pieces = 32
    digest = hashlib.sha256()
    for _ in range(pieces):
        digest.update(piece)
    name = f"sha256:{digest.hexdigest()}"
    with httpx.Client(timeout=300) as client:
        client.get(f"{a.url}/v2/")
        client.get(f"{b.url}/v2/")
        before = {proxy.pid: _peak_rss(proxy.pid) for proxy in (a, b)}
        location = client.post(f"{a.url}/v2/acme/big/blobs/uploads/").headers["Location"]
        patched = client.patch(f"{b.url}{location}", content=(piece for _ in range(pieces)))
        assert patched.status_code == 202 and patched.headers["Range"] == f"0-{pieces * len(piece) - 1}"
        assert client.put(f"{b.url}{patched.headers['Location']}", params={"digest": name}).status_code == 201
        grown = {pid: _peak_rss(pid) - rss for pid, rss in before.items()}
        back = hashlib.sha256()
        with client.stream("GET", f"{b.url}/v2/acme/big/blobs/{name}") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes(1 << 20):
                back.update(chunk)
        assert f"sha256:{back.hexdigest()}" == name
    print(f"128 MiB forwarded: peak RSS +{grown[b.pid] >> 20} MiB on B, +{grown[a.pid] >> 20} MiB on A")
    assert grown[b.pid] < 16 << 20  # B only passes the body on, chunk by chunk
    assert grown[a.pid] < 64 << 20  # A stages it on disk; the bucket upload buffers a few 5 MiB parts
