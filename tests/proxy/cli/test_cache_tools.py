"""`pullproxy cache ls | du | rm | verify` next to a running mirror."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.clients import skopeo_copy
from tests.support.commands import blob_file, pullproxy
from tests.support.images import PushedImage
from tests.support.proxy import Proxy
from tests.support.registry import Registry


def test_verify_removes_a_blob_corrupted_on_disk_and_the_mirror_fetches_it_again(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    alpine: PushedImage = upstream.images["alpine"]  # type: ignore[attr-defined]
    proxy = proxy_factory(upstream_url=upstream.url)
    skopeo_copy(f"docker://{proxy.host}/{alpine.repo}:{alpine.tag}", f"dir:{tmp_path / 'first'}")
    assert pullproxy(proxy, "cache", "verify").returncode == 0

    layer = alpine.blobs[-1]
    path = blob_file(proxy, layer.digest)
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    found = pullproxy(proxy, "cache", "verify", check=False)
    assert found.returncode == 1 and f"removed corrupt {layer.digest}" in found.stdout
    assert pullproxy(proxy, "cache", "verify").returncode == 0

    fetched = httpx.get(f"{proxy.url}/v2/{alpine.repo}/blobs/{layer.digest}", timeout=10)
    assert fetched.status_code == 200 and fetched.content == data


def test_ls_du_and_rm_keep_content_other_tags_share(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    tagged: PushedImage = upstream.images["tagged"]  # type: ignore[attr-defined]
    alpine: PushedImage = upstream.images["alpine_319"]  # type: ignore[attr-defined]
    proxy = proxy_factory(upstream_url=upstream.url)
    for ref in (f"{tagged.repo}:v1", f"{tagged.repo}:v2", f"{alpine.repo}:{alpine.tag}"):
        skopeo_copy(f"docker://{proxy.host}/{ref}", f"dir:{tmp_path / ref.replace('/', '-')}")

    listing = pullproxy(proxy, "cache", "ls").stdout
    for name in ("docker.io/acme/tagged:v1", "docker.io/acme/tagged:v2", "docker.io/library/alpine:3.19"):
        assert name in listing
    assert "blobs" in pullproxy(proxy, "cache", "du").stdout

    # v1 and v2 are one image: removing v1 must keep what v2 needs.
    assert "freed 0 B" in pullproxy(proxy, "cache", "rm", "docker.io/acme/tagged:v1").stdout
    pullproxy(proxy, "cache", "rm", "alpine:3.19")  # a Docker Hub short name, as clients write it
    listing = pullproxy(proxy, "cache", "ls").stdout
    assert "acme/tagged:v1" not in listing and "alpine:3.19" not in listing and "acme/tagged:v2" in listing
    assert pullproxy(proxy, "cache", "rm", "alpine:3.19", check=False).returncode != 0

    upstream.stop()
    try:
        skopeo_copy(f"docker://{proxy.host}/{tagged.repo}:v2", f"dir:{tmp_path / 'kept'}")
        gone = httpx.get(f"{proxy.url}/v2/{alpine.repo}/blobs/{alpine.blobs[-1].digest}", timeout=10)
        assert gone.status_code == 503  # removed from disk: the mirror would have to fetch it
    finally:
        upstream.start()
