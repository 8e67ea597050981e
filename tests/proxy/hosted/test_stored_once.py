"""A blob pushed to a hosted repository and later pulled through a mirrored name is stored once.

Against the fault-injecting upstream, which counts every GET it serves: the mirror confirms with
a HEAD that the upstream repository has the digest, then takes a hard link to the hosted file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from cache.store import DiskContentStore
from tests.proxy.hosted.test_push_api import sha
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

LAYER = os.urandom(256 << 10)


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def proxy(faulty: FaultyRegistry) -> Iterator[Proxy]:
    with Proxy({"hosted": {"repositories": ["acme/**"]}}, upstream_url=faulty.url) as running:
        yield running


def _stored(proxy: Proxy, digest: str) -> tuple[os.stat_result | None, os.stat_result | None]:
    """The cache's and the hosted store's file of `digest`, as `os.stat` sees them."""
    answers = []
    for directory in (proxy.cache_dir, proxy.cache_dir / "hosted"):
        store = DiskContentStore(directory, 1 << 40)
        try:
            found = store.find_blob(digest)
            answers.append(None if found is None else os.stat(found.path))
        finally:
            store.close()
    return answers[0], answers[1]


def test_a_pushed_blob_pulled_through_a_mirrored_name_is_not_downloaded_again(
    proxy: Proxy, faulty: FaultyRegistry
) -> None:
    digest = faulty.add_blob(LAYER)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        pushed = client.post("/v2/acme/app/blobs/uploads/", params={"digest": digest}, content=LAYER)
        assert pushed.status_code == 201
        faulty.reset_log()
        pulled = client.get(f"/v2/library/base/blobs/{digest}")
        assert pulled.status_code == 200
        assert pulled.content == LAYER
        assert client.get(f"/v2/library/base/blobs/{digest}").content == LAYER  # now a cache hit
    assert faulty.gets(digest) == 0
    assert faulty.count("GET", digest) == 0
    assert faulty.count("HEAD", f"/v2/library/base/blobs/{digest}") == 1  # the upstream repository holds it
    cached, hosted = _stored(proxy, digest)
    assert cached is not None and hosted is not None
    assert cached.st_ino == hosted.st_ino and cached.st_nlink == 2  # one file, two names: stored once


def test_a_ranged_pull_of_a_pushed_blob_is_served_from_the_hosted_bytes(proxy: Proxy, faulty: FaultyRegistry) -> None:
    layer = os.urandom(64 << 10)
    digest = faulty.add_blob(layer)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.post("/v2/acme/ranged/blobs/uploads/", params={"digest": digest}, content=layer).status_code
        faulty.reset_log()
        part = client.get(f"/v2/library/ranged/blobs/{digest}", headers={"Range": "bytes=100-199"})
    assert (part.status_code, part.content) == (206, layer[100:200])
    assert faulty.count("GET", digest) == 0
    cached, hosted = _stored(proxy, digest)
    assert cached is not None and hosted is not None and cached.st_ino == hosted.st_ino


def test_hosted_bytes_are_not_served_under_a_mirrored_name_the_upstream_lacks(
    proxy: Proxy, faulty: FaultyRegistry
) -> None:
    secret = b"pushed, never upstream" * 100
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.post("/v2/acme/secret/blobs/uploads/", params={"digest": sha(secret)}, content=secret)
        for method in ("GET", "HEAD"):
            answer = client.request(method, f"/v2/library/base/blobs/{sha(secret)}")
            assert answer.status_code == 404
        assert client.get(f"/v2/library/base/blobs/{sha(secret)}").json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    cached, hosted = _stored(proxy, sha(secret))
    assert cached is None and hosted is not None
