"""Ranges of blobs the cache does not hold yet: answered at once from an upstream range request while
the one full download goes on for the cache; several ranges as multipart/byteranges.

The lazy-pull tests replay the requests stargz-snapshotter's remote reader sends (its daemon,
containerd-stargz-grpc, is not packaged in Debian; `tests.support.estargz` has the sequence, read
from its Go sources): the bytes=0-1 probe, HEAD, the footer, the TOC, then the chunks of two files
in one multi-range GET. The layer is a real eStargz made by Debian's `ctr-remote images convert
--estargz`, and one built in Python to the same format for the tests that need no containerd.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.mirror.blobs import MAX_RANGE_FETCHES_PER_BLOB
from tests.support import estargz
from tests.support.clients import Containerd
from tests.support.faulty import FaultyRegistry
from tests.support.images import OCI_MANIFEST, Pusher, image_config, make_layer, sha256_digest
from tests.support.multipart import parts_of
from tests.support.proxy import Proxy
from tests.support.registry import Registry

FILES = {f"usr/lib/file{i}": os.urandom(200_000) for i in range(40)}  # random: gzip keeps them as large
WANTED = ["usr/lib/file2", "usr/lib/file30"]  # far apart: their chunks go out as two ranges of one GET


def fetched_bytes(proxy: Proxy) -> float:
    """pullproxy_upstream_fetched_bytes_total, every upstream."""
    text = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pullproxy_upstream_fetched_bytes_total"
    )


def ranged_requests_logged(proxy: Proxy, digest: str) -> int:
    """Lines of the mirror's access log answering a GET of the blob with 206."""
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    return sum(
        1
        for line in lines
        if line.get("event") == "request" and line.get("status") == 206 and str(line.get("path", "")).endswith(digest)
    )


def visible_blob_files(proxy: Proxy) -> list[Path]:
    content = proxy.cache_dir / "content"
    return [p for p in content.rglob("*.val")] if content.exists() else []


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def layer() -> bytes:
    return estargz.build(FILES)


@pytest.fixture
def registry(registry_factory: Callable[..., Registry], layer: bytes) -> Registry:
    registry = registry_factory()
    with Pusher(registry.url) as pusher:
        pusher.push_blob("lazy/app", layer)
    return registry


def test_stargz_reader_pulls_lazily_through_the_mirror_from_distribution(registry: Registry, layer: bytes) -> None:
    digest = sha256_digest(layer)
    with Proxy(upstream_url=registry.url) as proxy, httpx.Client(timeout=30) as client:
        reader = estargz.LazyReader(client, f"{proxy.url}/v2/lazy/app/blobs/{digest}")
        assert reader.size == len(layer)
        entries = reader.toc()
        assert [e["name"] for e in entries] == list(FILES)
        assert reader.files(entries, WANTED) == {name: FILES[name] for name in WANTED}
        assert any("," in sent for sent in reader.sent)  # a multi-range GET was sent, and answered
        assert set(reader.statuses) == {206}  # never the whole blob
        assert reader.received < len(layer) / 4
        assert ranged_requests_logged(proxy, digest) == len(reader.sent)  # the mirror's log has every range request
        # The full download went on for the cache, and what it stored is the verified blob.
        assert wait_for(lambda: len(visible_blob_files(proxy)) == 1)
        cached_parts = client.get(reader.url, headers={"Range": "bytes=0-9,-10"})
        assert parts_of(cached_parts) == [
            (f"bytes 0-9/{len(layer)}", layer[:10]),
            (f"bytes {len(layer) - 10}-{len(layer) - 1}/{len(layer)}", layer[-10:]),
        ]
        assert client.get(reader.url).content == layer


def test_a_real_estargz_image_made_by_ctr_remote_is_read_lazily_through_the_mirror(
    registry_factory: Callable[..., Registry], containerd: Containerd
) -> None:
    registry = registry_factory()
    files = {name: data for name, data in list(FILES.items())[:30]}
    layer = make_layer(files)
    with Pusher(registry.url) as pusher:
        pusher.push_image("lazy/real", "plain", image_config([layer.diff_id]), [layer])
    base = ["ctr-remote", "--address", containerd.socket, "--namespace", containerd.namespace, "images"]
    source, target = f"{registry.host}/lazy/real:plain", f"{registry.host}/lazy/real:esgz"
    for args in (["pull", "--plain-http", source], ["convert", "--estargz", "--oci", source, target]):
        subprocess.run([*base, *args], check=True, capture_output=True, timeout=120)
    subprocess.run([*base, "push", "--plain-http", target], check=True, capture_output=True, timeout=120)
    manifest = httpx.get(f"{registry.url}/v2/lazy/real/manifests/esgz", headers={"Accept": OCI_MANIFEST}).json()
    (converted,) = manifest["layers"]
    assert "containerd.io/snapshot/stargz/toc.digest" in converted["annotations"]  # a real eStargz layer
    wanted = ["usr/lib/file2", "usr/lib/file25"]
    with Proxy(upstream_url=registry.url) as proxy, httpx.Client(timeout=30) as client:
        reader = estargz.LazyReader(client, f"{proxy.url}/v2/lazy/real/blobs/{converted['digest']}")
        entries = reader.toc()
        assert {str(e["name"]) for e in entries} >= set(files)
        assert reader.files(entries, wanted) == {name: files[name] for name in wanted}
        assert any("," in sent for sent in reader.sent)  # a multi-range GET was sent, and answered
        assert set(reader.statuses) == {206}
        assert reader.received < converted["size"] / 4
        assert ranged_requests_logged(proxy, converted["digest"]) == len(reader.sent)
        assert wait_for(lambda: len(visible_blob_files(proxy)) == 1)  # the verified full download


@pytest.fixture
def slow_upstream(layer: bytes) -> Iterator[tuple[FaultyRegistry, str]]:
    with FaultyRegistry() as faulty:
        digest = faulty.add_blob(layer)
        faulty.slow(digest=digest, chunk_size=64 << 10, chunk_delay=0.3)  # the whole layer (8 MB): about 40 s
        yield faulty, digest


def test_lazy_pull_fetches_far_fewer_bytes_from_the_upstream_than_the_layer_holds(
    slow_upstream: tuple[FaultyRegistry, str], layer: bytes
) -> None:
    faulty, digest = slow_upstream
    with Proxy(upstream_url=faulty.url) as proxy, httpx.Client(timeout=30) as client:
        reader = estargz.LazyReader(client, f"{proxy.url}/v2/lazy/app/blobs/{digest}")
        entries = reader.toc()
        assert reader.files(entries, WANTED) == {name: FILES[name] for name in WANTED}
        fetched = fetched_bytes(proxy)
        asked = [r.headers.get("range") for r in faulty.requests() if digest in r.path and r.method == "GET"]
        assert set(reader.statuses) == {206}
        assert fetched < len(layer) / 3  # the ranges, and what the background download has so far
        assert asked.count(None) == 1  # one full download, started by the first range
        assert sum(1 for a in asked if a) >= 4  # the rest are ranges, one upstream request per range asked
        assert not visible_blob_files(proxy)  # range bytes are never stored


def test_a_cold_tail_range_is_one_upstream_range_request(faulty_slow_blob: tuple[FaultyRegistry, str, bytes]) -> None:
    faulty, digest, data = faulty_slow_blob
    with Proxy(upstream_url=faulty.url) as proxy, httpx.Client(timeout=30) as client:
        tail = client.get(f"{proxy.url}/v2/acme/app/blobs/{digest}", headers={"Range": "bytes=-400"})
        assert tail.status_code == 206
        assert tail.content == data[-400:]
        assert tail.headers["Content-Range"] == f"bytes {len(data) - 400}-{len(data) - 1}/{len(data)}"

        def asked() -> list[str | None]:
            return [r.headers.get("range") for r in faulty.requests() if digest in r.path and r.method == "GET"]

        assert wait_for(lambda: len(asked()) == 2)
        assert asked() == ["bytes=-400", None]  # the range at once, then the full download for the cache
        assert fetched_bytes(proxy) < len(data) / 2


@pytest.fixture
def faulty_slow_blob() -> Iterator[tuple[FaultyRegistry, str, bytes]]:
    with FaultyRegistry() as faulty:
        _, (_, layer) = faulty.add_image("acme/app", "1", layer_sizes=[4 << 20])
        faulty.slow(digest=layer, chunk_size=64 << 10, chunk_delay=0.2)  # 4 MiB: about 13 s
        yield faulty, layer, faulty.blob(layer)


def test_a_cold_range_under_a_repository_without_the_blob_is_refused_like_a_full_get(
    registry: Registry, layer: bytes
) -> None:
    digest = sha256_digest(layer)
    with Proxy(upstream_url=registry.url) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        for headers in ({}, {"Range": "bytes=-400"}, {"Range": "bytes=0-9,100-109"}):
            refused = client.get(f"/v2/other/app/blobs/{digest}", headers=headers)
            assert refused.status_code == 404
            assert refused.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert client.get(f"/v2/lazy/app/blobs/{digest}", headers={"Range": "bytes=-400"}).content == layer[-400:]
        assert wait_for(lambda: len(visible_blob_files(proxy)) == 1)
        refused = client.get(f"/v2/other/app/blobs/{digest}", headers={"Range": "bytes=0-9,100-109"})
        assert refused.status_code == 404  # cached now, but not this repository's


def test_overlapping_ranges_are_416_and_too_many_get_the_whole_blob(registry: Registry, layer: bytes) -> None:
    digest = sha256_digest(layer)
    with Proxy(upstream_url=registry.url) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        url = f"/v2/lazy/app/blobs/{digest}"
        overlapping = client.get(url, headers={"Range": "bytes=0-99,50-149"})
        assert overlapping.status_code == 416
        assert overlapping.headers["Content-Range"] == f"bytes */{len(layer)}"
        many = client.get(url, headers={"Range": "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(65))})
        assert many.status_code == 200
        assert many.content == layer


def test_upstream_range_requests_per_blob_are_bounded_and_the_rest_wait_for_the_download(
    faulty_slow_blob: tuple[FaultyRegistry, str, bytes],
) -> None:
    faulty, digest, data = faulty_slow_blob
    faulty.clear_faults()
    faulty.slow(digest=digest, times=2, header_delay=3.0)  # the first two (ranges) stay open 3 s
    faulty.slow(digest=digest, chunk_size=64 << 10, chunk_delay=0.1)  # the full download: about 6 s
    offsets = [len(data) - 1000 * (i + 1) for i in range(6)]
    with Proxy(upstream_url=faulty.url) as proxy, httpx.Client(base_url=proxy.url, timeout=60) as client:
        with ThreadPoolExecutor(len(offsets)) as pool:
            answers = list(
                pool.map(
                    lambda at: client.get(f"/v2/acme/app/blobs/{digest}", headers={"Range": f"bytes={at}-{at + 99}"}),
                    offsets,
                )
            )
        for at, answer in zip(offsets, answers, strict=True):
            assert answer.status_code == 206
            assert answer.content == data[at : at + 100]
        asked = [r.headers.get("range") for r in faulty.requests() if digest in r.path and r.method == "GET"]
        assert asked.count(None) == 1  # one full download, which served the others
        assert len(asked) - 1 == MAX_RANGE_FETCHES_PER_BLOB  # no more upstream ranges of one blob at once
