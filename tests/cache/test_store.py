"""The disk cache: size-bounded LRU that keeps what is in use, and nothing half-written visible."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from cache import digests
from cache.store import DiskContentStore
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

MIB = 1 << 20


def stage(store: DiskContentStore, data: bytes) -> tuple[str, Path]:
    path = store.partial_dir / f"staged-{len(os.listdir(store.partial_dir))}"
    path.write_bytes(data)
    return digests.of(data), path


def test_lru_evicts_the_least_recently_used_and_stays_under_the_limit(tmp_path: Path) -> None:
    store = DiskContentStore(tmp_path, max_size=int(3.5 * MIB))
    blobs = {name: os.urandom(MIB) for name in "abcd"}
    ids = {}
    for name in "abc":
        ids[name], path = stage(store, blobs[name])
        store.put_blob(ids[name], path)
    assert store.cached_blob_path(ids["a"]) is None  # not yet remembered in memory
    assert store.find_blob(ids["a"]) is not None
    time.sleep(0.01)
    # A hit on "a" through the in-memory hot path must count as a use.
    assert store.cached_blob_path(ids["a"]) is not None
    ids["d"], path = stage(store, blobs["d"])
    store.put_blob(ids["d"], path)
    assert store.find_blob(ids["b"]) is None
    for name in "acd":
        found = store.find_blob(ids[name])
        assert found is not None
        assert Path(found[0]).read_bytes() == blobs[name]
    assert store.volume() <= 3.5 * MIB
    store.close()


def test_cache_is_kept_across_reopening(tmp_path: Path) -> None:
    store = DiskContentStore(tmp_path, max_size=10 * MIB)
    digest, path = stage(store, b"kept")
    store.put_blob(digest, path)
    store.close()
    reopened = DiskContentStore(tmp_path, max_size=10 * MIB)
    found = reopened.find_blob(digest)
    assert found is not None and Path(found[0]).read_bytes() == b"kept"
    reopened.close()


def test_mirror_cache_stays_bounded_under_many_pulls(tmp_path: Path) -> None:
    with FaultyRegistry() as upstream:
        _, layers = upstream.add_image("acme/many", "1", layer_sizes=[MIB] * 8)
        with Proxy({"cache": {"max_size": "3MiB"}}, upstream_url=upstream.url) as proxy, httpx.Client() as client:
            for layer in layers:
                response = client.get(f"{proxy.url}/v2/acme/many/blobs/{layer}", timeout=10)
                assert response.content == upstream.blob(layer)
            stored = sum(p.stat().st_size for p in (proxy.cache_dir / "content").rglob("*.val"))
            assert stored <= 3 * MIB
            # The most recent one is still served from disk.
            upstream.stop()
            assert client.get(f"{proxy.url}/v2/acme/many/blobs/{layers[-1]}", timeout=10).status_code == 200


def test_killed_mid_download_leaves_nothing_visible() -> None:
    with FaultyRegistry() as upstream:
        _, (_, layer) = upstream.add_image("acme/app", "1", layer_sizes=[4 * MIB])
        slow = upstream.slow(digest=layer, chunk_size=256 << 10, chunk_delay=0.2)
        with Proxy(upstream_url=upstream.url) as proxy:
            url = f"{proxy.url}/v2/acme/app/blobs/{layer}"
            with httpx.Client(timeout=10) as client, client.stream("GET", url) as response:
                next(response.iter_raw())
                assert proxy.pid is not None
                os.kill(proxy.pid, signal.SIGKILL)
            proxy.stop()
            assert list((proxy.cache_dir / "content").rglob("*.val")) == []
            upstream.remove_fault(slow)
            proxy.start()
            assert httpx.get(url, timeout=20).content == upstream.blob(layer)
