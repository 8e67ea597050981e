"""Pin the test harness itself against the bare registry (no mirror involved).

If the image builder, the clients or the registry wrapper were subtly wrong,
mirror tests would fail (or pass) for the wrong reason; these tests prove each
piece works on its own with the real distribution server.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import SeededRegistry
from tests.support.clients import (
    DOCKER_ACCEPTS,
    CommandError,
    Containerd,
    docker_daemon_pull,
    read_dir_image,
    skopeo_copy,
    skopeo_inspect_raw,
    write_authfile,
)
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    HELM_CHART,
    HELM_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    PushedImage,
    fetch_manifest,
    push_oci_image,
    push_random_blob,
)
from tests.support.proxy import Proxy, to_toml
from tests.support.registry import Registry

SMALL = ["alpine", "alpine_319", "multi", "docker", "dockerlist", "helm", "tagged"]


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def assert_dir_matches(files: dict[str, bytes], image: PushedImage) -> None:
    """A skopeo ``dir:`` copy holds exactly the pushed manifest(s) and blobs."""
    assert files["manifest.json"] == image.manifest
    for child in image.children:
        assert files[f"{_hex(child.digest)}.manifest.json"] == child.manifest
    for blob in image.all_blobs():
        data = files[_hex(blob.digest)]
        assert len(data) == blob.size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


# ----------------------------------------------------------------------- seeded corpus


def test_seeded_manifests_are_served_verbatim(upstream: SeededRegistry) -> None:
    for image in upstream.images.values():
        for tag in image.tags:
            resp = fetch_manifest(upstream.url, image.repo, tag)
            assert resp.status_code == 200, (image.ref, tag)
            assert resp.content == image.manifest
            assert resp.headers["content-type"] == image.media_type
            assert resp.headers["docker-content-digest"] == image.digest
        for child in image.children:
            assert fetch_manifest(upstream.url, image.repo, child.digest).content == child.manifest


def test_seeded_media_types(upstream: SeededRegistry) -> None:
    imgs = upstream.images
    assert imgs["alpine"].media_type == OCI_MANIFEST
    assert imgs["multi"].media_type == OCI_INDEX
    assert {c.platform["architecture"] for c in imgs["multi"].children if c.platform} == {"amd64", "arm64"}
    assert imgs["docker"].media_type == DOCKER_MANIFEST
    assert imgs["dockerlist"].media_type == DOCKER_LIST
    assert [b.media_type for b in imgs["helm"].blobs] == [HELM_CONFIG, HELM_CHART]
    assert imgs["big"].blobs[1].media_type == OCI_LAYER
    assert len(imgs["tagged"].tags) == 7
    assert imgs["alpine"].digest != imgs["alpine_319"].digest


def test_oci_manifest_needs_oci_accept(upstream: SeededRegistry) -> None:
    """distribution 2.8 hides OCI manifests from clients that do not ask for them."""
    image = upstream.images["alpine"]
    bare = httpx.get(f"{upstream.url}/v2/{image.repo}/manifests/{image.tag}", timeout=10)
    assert bare.status_code == 404


def test_big_layer_config_is_consistent(upstream: SeededRegistry) -> None:
    big = upstream.images["big"]
    assert big.config is not None
    config = json.loads(big.config)
    layer = big.blobs[1]
    assert config["rootfs"]["diff_ids"] == [layer.digest]  # uncompressed: digest == diff_id
    head = httpx.head(f"{upstream.url}/v2/{big.repo}/blobs/{layer.digest}", timeout=10)
    assert int(head.headers["content-length"]) == layer.size > 1 << 20


# ----------------------------------------------------------------------- skopeo


@pytest.mark.parametrize("key", SMALL)
def test_skopeo_copies_seeded_image(upstream: SeededRegistry, key: str, tmp_path: Path) -> None:
    image = upstream.images[key]
    dest = tmp_path / "out"
    skopeo_copy(f"docker://{upstream.host}/{image.ref}", f"dir:{dest}", all=image.is_index)
    assert_dir_matches(read_dir_image(dest), image)
    assert skopeo_inspect_raw(f"docker://{upstream.host}/{image.ref}") == image.manifest


def test_skopeo_copies_big_image(upstream: SeededRegistry, tmp_path: Path) -> None:
    image = upstream.images["big"]
    dest = tmp_path / "big"
    skopeo_copy(f"docker://{upstream.host}/{image.ref}", f"dir:{dest}", timeout=300)
    layer = image.blobs[1]
    assert (dest / "manifest.json").read_bytes() == image.manifest
    h = hashlib.sha256()
    with open(dest / _hex(layer.digest), "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == layer.digest


def test_skopeo_reports_stderr_on_failure(upstream: SeededRegistry, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="manifest unknown"):
        skopeo_copy(f"docker://{upstream.host}/library/alpine:nope", f"dir:{tmp_path / 'x'}")


# ----------------------------------------------------------------------- containerd


def test_containerd_pulls_through_hosts_toml(upstream: SeededRegistry, containerd: Containerd) -> None:
    image = upstream.images["alpine"]
    hosts = containerd.write_hosts_toml("docker.io", upstream.url)
    assert tomllib.loads(hosts.read_text())["host"][upstream.url]["capabilities"] == ["pull", "resolve"]
    containerd.pull(f"docker.io/{image.ref}")  # unpacks with the overlayfs snapshotter
    assert containerd.images()[f"docker.io/{image.ref}"] == image.digest
    assert containerd.content(image.digest) == image.manifest
    for blob in image.blobs:
        assert hashlib.sha256(containerd.content(blob.digest)).hexdigest() == _hex(blob.digest)


def test_containerd_pulls_index_all_platforms(upstream: SeededRegistry, containerd: Containerd) -> None:
    image = upstream.images["multi"]
    containerd.write_hosts_toml("docker.io", upstream.url)
    containerd.pull(f"docker.io/{image.ref}", all_platforms=True)
    have = containerd.content_digests()
    assert {m.digest for m in image.all_manifests()} | {b.digest for b in image.all_blobs()} <= have


def test_containerd_fetches_helm_chart_without_unpack(upstream: SeededRegistry, containerd: Containerd) -> None:
    image = upstream.images["helm"]
    containerd.write_hosts_toml("docker.io", upstream.url)
    containerd.pull(f"docker.io/{image.ref}", unpack=False)
    assert containerd.content(image.blobs[1].digest) != b""
    assert containerd.images()[f"docker.io/{image.ref}"] == image.digest


# ----------------------------------------------------------------------- docker daemon


@pytest.mark.parametrize("key", ["multi", "dockerlist", "docker", "alpine"])
def test_docker_daemon_pull_reproduction(upstream: SeededRegistry, key: str) -> None:
    image = upstream.images[key]
    assert image.tag is not None
    pulled = docker_daemon_pull(upstream.url, image.repo, image.tag)
    assert pulled.tag_digest == image.digest
    expected = image.child("linux", "amd64") if image.is_index else image
    assert pulled.platform_digest == expected.digest
    assert set(pulled.blobs) == {b.digest for b in expected.blobs}
    assert [r[0] for r in pulled.requests[:3]] == ["GET", "HEAD", "GET"]
    assert len(DOCKER_ACCEPTS) == 6


def test_docker_accept_lines_are_separate(upstream: SeededRegistry) -> None:
    """httpx sends a list of header tuples as separate lines, like Go's Header.Add."""
    req = httpx.Request("HEAD", f"{upstream.url}/v2/x/manifests/y", headers=[("Accept", a) for a in DOCKER_ACCEPTS])
    assert req.headers.get_list("accept") == list(DOCKER_ACCEPTS)


# ----------------------------------------------------------------------- registry modes


def test_htpasswd_registry(registry_factory: Callable[..., Registry], tmp_path: Path) -> None:
    reg = registry_factory(users={"alice": "s3cret"})
    anon = httpx.get(f"{reg.url}/v2/", timeout=10)
    assert anon.status_code == 401
    assert anon.headers["www-authenticate"].startswith("Basic ")
    assert httpx.get(f"{reg.url}/v2/", auth=("alice", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{reg.url}/v2/", auth=("alice", "s3cret"), timeout=10).status_code == 200

    image = push_oci_image(reg.url, "library/alpine", "latest", auth=("alice", "s3cret"))
    assert fetch_manifest(reg.url, image.repo, "latest").status_code == 401
    assert fetch_manifest(reg.url, image.repo, "latest", auth=("alice", "s3cret")).content == image.manifest
    with pytest.raises(CommandError):
        skopeo_inspect_raw(f"docker://{reg.host}/{image.ref}")
    authfile = write_authfile(tmp_path / "auth.json", reg.host, "alice", "s3cret")
    assert skopeo_inspect_raw(f"docker://{reg.host}/{image.ref}", authfile=authfile) == image.manifest


def test_htpasswd_registry_with_containerd(registry_factory: Callable[..., Registry], containerd: Containerd) -> None:
    reg = registry_factory(users={"alice": "s3cret"})
    image = push_oci_image(reg.url, "library/alpine", "latest", auth=("alice", "s3cret"))
    containerd.write_hosts_toml("docker.io", reg.url)
    with pytest.raises(CommandError, match="401"):
        containerd.pull(f"docker.io/{image.ref}")
    containerd.pull(f"docker.io/{image.ref}", user="alice:s3cret")
    assert containerd.images()[f"docker.io/{image.ref}"] == image.digest


def test_proxy_mode_registry(upstream: SeededRegistry, registry_factory: Callable[..., Registry]) -> None:
    """distribution's own pull-through cache (the benchmark reference) serves the corpus."""
    mirror = registry_factory(proxy_remote=upstream.url)
    for key in ("alpine", "multi"):
        image = upstream.images[key]
        assert fetch_manifest(mirror.url, image.repo, image.tag or "").content == image.manifest
    pulled = docker_daemon_pull(mirror.url, "acme/docker", "latest")
    assert pulled.tag_digest == upstream.images["docker"].digest


def test_proxy_mode_cannot_use_basic_upstream_auth(registry_factory: Callable[..., Registry]) -> None:
    """Pin a distribution 2.8 limitation: proxy.username/password are only sent to
    Bearer token realms, never as Basic auth, so an htpasswd origin looks empty.
    Benchmarks that need an authenticated origin must not use this combination."""
    origin = registry_factory(users={"bob": "pw"})
    image = push_oci_image(origin.url, "acme/private", "v1", auth=("bob", "pw"))
    mirror = registry_factory(proxy_remote=origin.url, proxy_username="bob", proxy_password="pw")
    assert fetch_manifest(mirror.url, image.repo, "v1").status_code == 404


def test_registry_restart_keeps_port_and_storage(registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory()
    blob = push_random_blob(reg.url, "bench/blob", 3 << 20, seed="restart")
    url = reg.url
    reg.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/", timeout=2)
    reg.start()
    assert reg.url == url
    resp = httpx.get(f"{reg.url}/v2/bench/blob/blobs/{blob.digest}", timeout=30)
    assert resp.status_code == 200 and len(resp.content) == blob.size
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == blob.digest


def test_tags_list_is_not_paginated_by_distribution(upstream: SeededRegistry) -> None:
    """distribution 2.8 ignores ?n= on tags/list (and returns directory order);
    _catalog does paginate. Mirror tests must not assume upstream pagination."""
    tags = httpx.get(f"{upstream.url}/v2/acme/tagged/tags/list?n=3", timeout=10)
    assert sorted(tags.json()["tags"]) == [f"v{i}" for i in range(1, 8)]
    assert "link" not in tags.headers
    catalog = httpx.get(f"{upstream.url}/v2/_catalog?n=2", timeout=10)
    assert len(catalog.json()["repositories"]) == 2 and 'rel="next"' in catalog.headers["link"]


# ----------------------------------------------------------------------- helpers


def test_to_toml_round_trips() -> None:
    config = {
        "server": {"listen": "127.0.0.1:1234", "workers": 2},
        "cache": {"dir": '/tmp/x "quoted"', "max_size": "1GiB", "tag_ttl": "30s", "unused": None},
        "upstream": [
            {"name": "docker.io", "url": "http://127.0.0.1:1", "default": True},
            {"name": "ghcr.io", "url": "http://127.0.0.1:2", "prefix": "ghcr.io", "ratio": 0.5, "l": [1, 2]},
        ],
    }
    parsed = tomllib.loads(to_toml(config))
    del config["cache"]["unused"]
    assert parsed == config


def test_proxy_harness_starts_restarts_and_reports_failures(
    upstream: SeededRegistry, proxy_factory: Callable[..., Proxy]
) -> None:
    """The Proxy helper runs ``python -m proxy serve`` on a free port and keeps it on restart."""
    pytest.importorskip("proxy.cli.main")
    proxy = proxy_factory(upstream_url=upstream.url)
    assert httpx.get(f"{proxy.url}/v2/", timeout=10).status_code == 200
    url, pid = proxy.url, proxy.pid
    proxy.stop()
    assert not proxy.running
    proxy.start()
    assert proxy.url == url and proxy.pid != pid
    assert httpx.get(f"{proxy.url}/v2/", timeout=10).status_code == 200

    with pytest.raises(RuntimeError, match="log tail"):
        proxy_factory({"cache": {"no_such_key": 1}}, upstream_url=upstream.url)
