"""Real clients through the mirror, from real upstream registries (CNCF distribution 2.8).

skopeo is the library podman and CRI-O use; containerd's `ctr` runs against a daemon
started in a temporary folder; the Docker daemon's requests are reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.clients import Containerd, docker_daemon_pull, read_dir_image, run, skopeo_copy
from tests.support.images import PushedImage, push_oci_image
from tests.support.proxy import Proxy
from tests.support.registry import Registry

CLOSED = "127.0.0.1:1"  # a registry location skopeo may fall back to: refuses at once


def assert_same_image(folder: Path, image: PushedImage, all_platforms: bool = False) -> None:
    """skopeo's dir: copy holds exactly the upstream's manifest bytes and verified blobs."""
    files = read_dir_image(folder)
    expected = image if all_platforms or not image.is_index else image.child()
    assert files["manifest.json"] == expected.manifest
    for name, data in files.items():
        if name not in ("manifest.json", "version") and not name.endswith(".manifest.json"):
            assert hashlib.sha256(data).hexdigest() == name, f"blob {name} corrupted"
    if all_platforms and image.is_index:
        for child in image.children:
            assert files[f"{child.digest.split(':')[1]}.manifest.json"] == child.manifest
    for blob in expected.all_blobs() if not image.is_index or all_platforms else expected.blobs:
        assert blob.digest.split(":")[1] in files


def registries_conf(path: Path, mirrors: dict[str, str]) -> Path:
    """podman/CRI-O style: each registry mirrored at a path prefix of the mirror."""
    text = "unqualified-search-registries = []\n"
    for registry, mirror in mirrors.items():
        text += (
            f'\n[[registry]]\nprefix = "{registry}"\nlocation = "{CLOSED}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
        )
    path.write_text(text)
    return path


def test_skopeo_pulls_every_kind_of_image_byte_for_byte_online_offline_and_after_restart(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    proxy = proxy_factory({"cache": {"tag_ttl": "0s", "max_size": "2GiB"}}, upstream_url=upstream.url)
    kinds = ["alpine", "multi", "docker", "dockerlist", "helm", "big"]

    def pull_all(round_name: str) -> None:
        for kind in kinds:
            image = images[kind]
            for all_platforms in (False, True) if image.is_index else (False,):
                folder = tmp_path / f"{round_name}-{kind}-{all_platforms}"
                skopeo_copy(
                    f"docker://{proxy.host}/{image.repo}:{image.tag}", f"dir:{folder}", all=all_platforms, timeout=300
                )
                assert_same_image(folder, image, all_platforms)

    pull_all("online")
    upstream.stop()
    try:
        pull_all("offline")
        proxy.stop()
        proxy.start()
        pull_all("restarted")
        assert '"cache": "stale"' in proxy.log_text()
    finally:
        upstream.start()


def test_docker_daemon_requests_pull_an_official_image(upstream: Registry, proxy_factory: Callable[..., Proxy]) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    proxy = proxy_factory(upstream_url=upstream.url)
    alpine = images["alpine"]
    assert alpine.repo.startswith("library/")
    pulled = docker_daemon_pull(proxy.url, alpine.repo.removeprefix("library/"), alpine.tag or "latest")
    assert pulled.tag_digest == alpine.digest


def test_containerd_pulls_from_two_upstreams_by_ns(
    upstream: Registry,
    registry_factory: Callable[..., Registry],
    proxy_factory: Callable[..., Proxy],
    containerd: Containerd,
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    other = registry_factory()
    # The same repository name on the second registry, with different content.
    theirs = push_oci_image(other.url, "library/alpine", ["latest"], seed="ghcr-alpine")
    ours = images["alpine"]
    assert theirs.digest != ours.digest
    proxy = proxy_factory(
        {
            "upstream": [
                {"name": "docker.io", "url": upstream.url, "default": True},
                {"name": "ghcr.io", "url": other.url},
            ]
        }
    )
    containerd.write_hosts_toml("docker.io", proxy.url)
    containerd.write_hosts_toml("ghcr.io", proxy.url)
    containerd.pull("docker.io/library/alpine:latest", platform="linux/amd64")
    containerd.pull("ghcr.io/library/alpine:latest", platform="linux/amd64")
    pulled = containerd.images()
    assert pulled["docker.io/library/alpine:latest"] == ours.digest
    assert pulled["ghcr.io/library/alpine:latest"] == theirs.digest
    log = proxy.log_text()
    assert "ns=docker.io" in log and "ns=ghcr.io" in log
    for blob in theirs.all_blobs():
        assert hashlib.sha256(containerd.content(blob.digest)).hexdigest() == blob.digest.split(":")[1]


def test_skopeo_mirrors_with_path_prefixes_for_two_upstreams_one_behind_basic_auth(
    upstream: Registry,
    registry_factory: Callable[..., Registry],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    private = registry_factory(users={"robot": "s3cret-pw"})
    internal = push_oci_image(private.url, "team/app", ["1.0"], seed="internal-app", auth=("robot", "s3cret-pw"))
    proxy = proxy_factory(
        {
            "upstream": [
                {"name": "docker.io", "url": upstream.url, "default": True},
                {
                    "name": "registry.example:5000",
                    "url": private.url,
                    "prefix": "internal",
                    "username": "robot",
                    "password_env": "INTERNAL_PASSWORD",
                },
            ]
        },
        env={"INTERNAL_PASSWORD": "s3cret-pw"},
    )
    conf = registries_conf(
        tmp_path / "registries.conf",
        {"docker.io": proxy.host, "registry.example:5000": f"{proxy.host}/internal"},
    )
    hub = images["docker"]
    skopeo_copy(f"docker://docker.io/{hub.repo}:{hub.tag}", f"dir:{tmp_path / 'hub'}", registries_conf=conf)
    assert_same_image(tmp_path / "hub", hub)
    skopeo_copy("docker://registry.example:5000/team/app:1.0", f"dir:{tmp_path / 'internal'}", registries_conf=conf)
    assert_same_image(tmp_path / "internal", internal)
    log = proxy.log_text()
    assert "/v2/internal/team/app/manifests/1.0" in log
    assert "s3cret-pw" not in log


def test_skopeo_lists_tags_through_the_mirror_and_offline(
    upstream: Registry, proxy_factory: Callable[..., Proxy]
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    tagged = images["tagged"]
    proxy = proxy_factory(upstream_url=upstream.url)

    def list_tags() -> list[str]:
        done = run(["skopeo", "list-tags", "--tls-verify=false", f"docker://{proxy.host}/{tagged.repo}"])
        return sorted(json.loads(done.stdout)["Tags"])

    assert list_tags() == sorted(tagged.tags)
    known = sorted(tagged.tags)[:3]
    for tag in known:
        httpx.get(f"{proxy.url}/v2/{tagged.repo}/manifests/{tag}", timeout=10).raise_for_status()
    upstream.stop()
    try:
        assert list_tags() == known  # the tags the cache knows, while the upstream is away
    finally:
        upstream.start()
