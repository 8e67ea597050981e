"""Keeping what matters: pinned images outlive LRU eviction and follow their tags; prefetch fills the cache now."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cache import digests
from cache.store import DiskContentStore
from tests.support.clients import CommandError, read_dir_image, skopeo_copy
from tests.support.commands import pullproxy
from tests.support.images import PushedImage, push_oci_image, push_random_blob
from tests.support.proxy import Proxy
from tests.support.registry import Registry

KIB = 1 << 10


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def assert_pulled(proxy: Proxy, image: PushedImage, folder: Path, all_platforms: bool = False) -> None:
    """skopeo through the mirror gets exactly the upstream's manifests and blobs."""
    skopeo_copy(f"docker://{proxy.host}/{image.repo}:{image.tag}", f"dir:{folder}", all=all_platforms)
    files = read_dir_image(folder)
    assert files["manifest.json"] == (image.manifest if all_platforms or not image.is_index else image.child().manifest)
    for blob in image.all_blobs() if all_platforms or not image.is_index else image.child().blobs:
        assert digests.matches(blob.digest, files[blob.digest.split(":")[1]])


def test_store_eviction_skips_pinned_entries_until_they_are_unpinned(tmp_path: Path) -> None:
    store = DiskContentStore(tmp_path, max_size=400 * KIB)
    added = []
    for i in range(6):
        data = os.urandom(100 * KIB)
        staged = store.partial_dir / f"staged-{i}"
        staged.write_bytes(data)
        added.append(digests.of(data))
        store.put_blob(added[-1], staged)
        if i == 0:
            store.pin([added[0]])
    assert store.has_blob(added[0]) and not store.has_blob(added[1])
    assert {e.digest for e in store.entries() if e.pinned} == {added[0]}
    store.keep_pinned({added[-1]})  # the pinned set moves on: the old one is ordinary LRU content again
    assert {e.digest for e in store.entries() if e.pinned} == {added[-1]}
    for i in range(6, 10):
        staged = store.partial_dir / f"staged-{i}"
        staged.write_bytes(os.urandom(100 * KIB))
        store.put_blob(digests.of(staged.read_bytes()), staged)
    assert not store.has_blob(added[0]) and store.has_blob(added[-1])
    store.close()


def test_a_pinned_image_survives_a_squeeze_that_evicts_everything_else(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    alpine, docker = images["alpine"], images["docker"]
    proxy = proxy_factory(
        {"cache": {"max_size": "1MiB"}, "pin": [{"image": f"docker.io/{alpine.repo}:{alpine.tag}"}]},
        upstream_url=upstream.url,
    )
    wait_for(lambda: "pinned" in pullproxy(proxy, "cache", "ls").stdout)  # the server's start-up round
    assert_pulled(proxy, docker, tmp_path / "docker")
    # Blobs that together overflow the whole cache (one larger than it would be refused): the
    # least recently used content, the docker image's, is evicted first.
    for i in range(4):
        blob = push_random_blob(upstream.url, "acme/squeeze", 300 * KIB, seed=f"squeeze-{i}")
        response = httpx.get(f"{proxy.url}/v2/acme/squeeze/blobs/{blob.digest}", timeout=60)
        assert response.status_code == 200 and digests.matches(blob.digest, response.content)
    listing = pullproxy(proxy, "cache", "ls").stdout
    assert f"docker.io/{alpine.repo}:{alpine.tag}" in listing and "pinned" in listing
    upstream.stop()
    try:
        assert_pulled(proxy, alpine, tmp_path / "alpine")
        with pytest.raises(CommandError):
            skopeo_copy(f"docker://{proxy.host}/{docker.repo}:{docker.tag}", f"dir:{tmp_path / 'gone'}")
    finally:
        upstream.start()


def test_prefetch_while_serving_then_upstream_stopped_then_skopeo_pulls(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    multi, dockerlist = images["multi"], images["dockerlist"]
    proxy = proxy_factory(upstream_url=upstream.url)
    done = pullproxy(proxy, "prefetch", f"{multi.repo}:{multi.tag}")  # every platform by default
    assert f"docker.io/{multi.repo}:{multi.tag}: 3 manifests, 6 blobs" in done.stderr
    pullproxy(proxy, "prefetch", "--platform", "linux/arm64", f"docker.io/{dockerlist.repo}:{dockerlist.tag}")
    listing = pullproxy(proxy, "cache", "ls").stdout
    assert "1/2 platforms" in listing.split(dockerlist.repo)[1].splitlines()[0]
    upstream.stop()
    try:
        assert_pulled(proxy, multi, tmp_path / "multi", all_platforms=True)
    finally:
        upstream.start()


def test_pins_follow_their_tag_on_schedule(
    registry_factory: Callable[..., Registry], proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    registry = registry_factory()
    first = push_oci_image(registry.url, "acme/app", "stable", seed="first")
    proxy = proxy_factory(
        {"cache": {"tag_ttl": "0s", "pin_refresh": "1s"}, "pin": [{"image": "acme/app:stable"}]},
        upstream_url=registry.url,
    )
    short = first.digest[:19]
    wait_for(lambda: short in pullproxy(proxy, "cache", "ls").stdout)
    second = push_oci_image(registry.url, "acme/app", "stable", seed="second")
    wait_for(lambda: second.digest[:19] in pullproxy(proxy, "cache", "ls").stdout)
    registry.stop()
    assert_pulled(proxy, second, tmp_path / "second")
    entries = DiskContentStore(proxy.cache_dir, 1 << 30)
    pinned = {e.digest for e in entries.entries() if e.pinned}
    entries.close()
    assert second.digest in pinned and first.digest not in pinned  # the old digest returned to the LRU
