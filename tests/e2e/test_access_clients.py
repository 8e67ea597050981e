"""Real clients through access rules: skopeo with an auth file and anonymously, containerd
with `--user` and anonymously, and the Docker daemon's anonymous requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_clients import assert_same_image
from tests.support.auth import user_entry
from tests.support.clients import CommandError, Containerd, docker_daemon_pull, skopeo_copy, write_authfile
from tests.support.images import PushedImage
from tests.support.proxy import Proxy
from tests.support.registry import Registry

ALICE = ("alice", "alice-pw")  # group dev
BOB = ("bob", "bob-pw")


@pytest.fixture
def proxy(upstream: Registry, proxy_factory: Callable[..., Proxy]) -> Proxy:
    """Docker Hub's official images public, the acme namespace for group dev, the rest for nobody."""
    return proxy_factory(
        {
            "auth": {"user": [user_entry(ALICE, "dev"), user_entry(BOB)]},
            "access": [
                {"repository": "docker.io/library/*", "pull": "anyone"},
                {"repository": "docker.io/acme/**", "pull": ["group:dev"]},
            ],
        },
        upstream_url=upstream.url,
    )


def images(upstream: Registry) -> dict[str, PushedImage]:
    return upstream.images  # type: ignore[attr-defined]


def test_skopeo_with_an_auth_file_pulls_a_private_image(upstream: Registry, proxy: Proxy, tmp_path: Path) -> None:
    private = images(upstream)["multi"]
    source = f"docker://{proxy.host}/{private.repo}:{private.tag}"
    alice = write_authfile(tmp_path / "alice.json", proxy.host, *ALICE)
    skopeo_copy(source, f"dir:{tmp_path / 'alice'}", all=True, authfile=alice)
    assert_same_image(tmp_path / "alice", private, all_platforms=True)
    bob = write_authfile(tmp_path / "bob.json", proxy.host, *BOB)
    with pytest.raises(CommandError, match="requested access to the resource is denied"):
        skopeo_copy(source, f"dir:{tmp_path / 'bob'}", authfile=bob)
    with pytest.raises(CommandError, match="authentication required"):
        skopeo_copy(source, f"dir:{tmp_path / 'anonymous'}")
    assert "alice-pw" not in proxy.log_text()


def test_skopeo_pulls_a_public_image_anonymously(upstream: Registry, proxy: Proxy, tmp_path: Path) -> None:
    public = images(upstream)["alpine"]
    skopeo_copy(f"docker://{proxy.host}/{public.repo}:{public.tag}", f"dir:{tmp_path / 'public'}")
    assert_same_image(tmp_path / "public", public)


def test_containerd_pulls_a_private_image_with_user_and_a_public_one_without(
    upstream: Registry, proxy: Proxy, containerd: Containerd
) -> None:
    private, public = images(upstream)["docker"], images(upstream)["alpine"]
    containerd.write_hosts_toml("docker.io", proxy.url)
    with pytest.raises(CommandError):
        containerd.pull(f"docker.io/{private.repo}:{private.tag}", user=":".join(BOB))
    containerd.pull(f"docker.io/{private.repo}:{private.tag}", user=":".join(ALICE))
    containerd.pull(f"docker.io/{public.repo}:{public.tag}", platform="linux/amd64")
    pulled = containerd.images()
    assert pulled[f"docker.io/{private.repo}:{private.tag}"] == private.digest
    assert pulled[f"docker.io/{public.repo}:{public.tag}"] == public.digest
    tokens = [line for line in proxy.log_text().splitlines() if '"path": "/token"' in line]
    assert any('"query": "ns=docker.io&' in line and '"user": "alice"' in line for line in tokens)


def test_docker_daemon_pulls_an_official_image_anonymously(upstream: Registry, proxy: Proxy) -> None:
    public = images(upstream)["alpine"]
    pulled = docker_daemon_pull(proxy.url, public.repo, public.tag or "latest")
    assert pulled.tag_digest == public.digest
    assert pulled.requests[0] == ("GET", "/v2/", 401)  # the challenge, which dockerd takes in its stride
