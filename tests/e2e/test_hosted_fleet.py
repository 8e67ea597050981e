"""skopeo pushing into one replica of a fleet (SeaweedFS + redis-server) and pulling back out through another."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_clients import assert_same_image
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
