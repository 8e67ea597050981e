"""Hosted repositories in process: the OCI push API, reads served locally, deletes, quotas, gc."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cache.mediatypes import OCI_MANIFEST
from cache.store import DiskContentStore
from proxy.config import Hosted
from proxy.hosted.repository import HostedRepositories
from tests.support.inprocess import MemoryRegistry, mirror_client
from tests.support.multipart import parts_of

EMPTY_CONFIG = b"{}"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(layer: bytes, config: bytes = EMPTY_CONFIG, **extra: Any) -> bytes:
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_EMPTY, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha(layer), "size": len(layer)}],
        **extra,
    }
    return json.dumps(body).encode()


@pytest.fixture
def upstream() -> MemoryRegistry:
    return MemoryRegistry()


def hosted_client(directory: Path, upstream: MemoryRegistry, **hosted: Any) -> Iterator[httpx.Client]:
    settings = Hosted(repositories=("acme/**", "charts/*"), **hosted)
    with mirror_client(directory, upstream, hosted=settings) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path, upstream: MemoryRegistry) -> Iterator[httpx.Client]:
    yield from hosted_client(tmp_path, upstream)


def push_blob(client: httpx.Client, repo: str, data: bytes) -> httpx.Response:
    return client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data)


def push_image(client: httpx.Client, repo: str, tag: str, layer: bytes, **extra: Any) -> str:
    assert push_blob(client, repo, EMPTY_CONFIG).status_code == 201
    assert push_blob(client, repo, layer).status_code == 201
    body = image_manifest(layer, **extra)
    response = client.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == sha(body)
    return sha(body)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error: dict[str, Any] = response.json()["errors"][0]
    assert error["code"] == code
    return error


def test_monolithic_push_then_pull_serves_the_same_bytes_locally(
    client: httpx.Client, upstream: MemoryRegistry
) -> None:
    digest = push_image(client, "acme/app", "v1", b"layer" * 1000)
    manifest = client.get("/v2/acme/app/manifests/v1")
    assert manifest.status_code == 200
    assert manifest.headers["Docker-Content-Digest"] == digest
    assert manifest.headers["Content-Type"] == OCI_MANIFEST
    assert client.get(f"/v2/acme/app/manifests/{digest}").content == manifest.content
    layer = client.get(f"/v2/acme/app/blobs/{sha(b'layer' * 1000)}")
    assert layer.content == b"layer" * 1000
    part = client.get(f"/v2/acme/app/blobs/{sha(b'layer' * 1000)}", headers={"Range": "bytes=5-9"})
    assert (part.status_code, part.content) == (206, b"layer")
    head = client.head(f"/v2/acme/app/blobs/{sha(b'layer' * 1000)}")
    assert head.headers["Content-Length"] == "5000"
    assert client.get("/v2/acme/app/tags/list").json() == {"name": "acme/app", "tags": ["v1"]}
    assert upstream.requests == []  # hosted names are never proxied


def test_a_hosted_blob_answers_several_ranges_as_multipart_byteranges(client: httpx.Client) -> None:
    """Lazy pullers (stargz-snapshotter) ask for several ranges at once, of hosted images too."""
    layer = bytes(range(256)) * 40
    push_image(client, "acme/lazy", "v1", layer)
    answer = client.get(f"/v2/acme/lazy/blobs/{sha(layer)}", headers={"Range": "bytes=0-9,100-109,-5"})
    assert answer.status_code == 206
    size = len(layer)
    assert parts_of(answer) == [
        (f"bytes 0-9/{size}", layer[0:10]),
        (f"bytes 100-109/{size}", layer[100:110]),
        (f"bytes {size - 5}-{size - 1}/{size}", layer[-5:]),
    ]
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    refused = client.get(f"/v2/acme/lazy/blobs/{sha(layer)}", headers={"Range": f"bytes={size}-"})
    assert refused.status_code == 416


def test_a_hosted_name_that_was_never_pushed_is_not_asked_upstream(
    client: httpx.Client, upstream: MemoryRegistry
) -> None:
    upstream.add_image("acme/app", "v1", b"upstream's")
    assert_error(client.get("/v2/acme/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert_error(client.get("/v2/acme/app/tags/list"), 404, "NAME_UNKNOWN")
    assert upstream.requests == []


def test_without_hosted_section_writes_stay_refused(tmp_path: Path, upstream: MemoryRegistry) -> None:
    with mirror_client(tmp_path, upstream) as client:
        assert_error(push_blob(client, "acme/app", b"x"), 405, "UNSUPPORTED")
        assert_error(client.put("/v2/acme/app/manifests/v1", content=b"{}"), 405, "UNSUPPORTED")


def test_writes_to_a_name_that_is_not_hosted_are_refused(client: httpx.Client) -> None:
    assert_error(push_blob(client, "library/alpine", b"x"), 405, "UNSUPPORTED")
    assert_error(client.delete(f"/v2/library/alpine/blobs/{sha(b'x')}"), 405, "UNSUPPORTED")


def test_post_then_put_with_the_body(client: httpx.Client) -> None:
    started = client.post("/v2/acme/app/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["Location"]
    assert location.startswith("/v2/acme/app/blobs/uploads/")
    assert started.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    done = client.put(location, params={"digest": sha(b"data")}, content=b"data")
    assert done.status_code == 201
    assert done.headers["Location"] == f"/v2/acme/app/blobs/{sha(b'data')}"
    assert done.headers["Docker-Content-Digest"] == sha(b"data")
    assert client.get(f"/v2/acme/app/blobs/{sha(b'data')}").content == b"data"


def test_chunked_upload_in_order_with_status_and_out_of_order_refused(client: httpx.Client) -> None:
    location = client.post("/v2/acme/app/blobs/uploads/").headers["Location"]
    first = client.patch(location, content=b"abc", headers={"Content-Range": "0-2"})
    assert first.status_code == 202
    assert first.headers["Range"] == "0-2"
    skipped = client.patch(location, content=b"xyz", headers={"Content-Range": "5-7"})
    assert_error(skipped, 416, "BLOB_UPLOAD_INVALID")
    assert skipped.headers["Range"] == "0-2"
    second = client.patch(location, content=b"def", headers={"Content-Range": "3-5"})
    assert second.headers["Range"] == "0-5"
    status = client.get(location)
    assert (status.status_code, status.headers["Range"]) == (204, "0-5")
    assert status.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    done = client.put(location, params={"digest": sha(b"abcdef")})
    assert done.status_code == 201
    assert client.get(f"/v2/acme/app/blobs/{sha(b'abcdef')}").content == b"abcdef"
    assert_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")  # finished


def test_a_wrong_digest_keeps_nothing(client: httpx.Client) -> None:
    location = client.post("/v2/acme/app/blobs/uploads/").headers["Location"]
    client.patch(location, content=b"abc")
    assert_error(client.put(location, params={"digest": sha(b"other")}), 400, "DIGEST_INVALID")
    assert_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.get(f"/v2/acme/app/blobs/{sha(b'abc')}"), 404, "BLOB_UNKNOWN")
    assert_error(client.get(f"/v2/acme/app/blobs/{sha(b'other')}"), 404, "BLOB_UNKNOWN")
    monolithic = client.post("/v2/acme/app/blobs/uploads/", params={"digest": sha(b"other")}, content=b"abc")
    assert_error(monolithic, 400, "DIGEST_INVALID")


def test_cancelled_upload_is_gone(client: httpx.Client) -> None:
    location = client.post("/v2/acme/app/blobs/uploads/").headers["Location"]
    assert client.delete(location).status_code == 204
    assert_error(client.patch(location, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.get("/v2/acme/app/blobs/uploads/" + "0" * 32), 404, "BLOB_UPLOAD_UNKNOWN")


def test_an_upload_belongs_to_its_repository(client: httpx.Client) -> None:
    upload = client.post("/v2/acme/app/blobs/uploads/").headers["Docker-Upload-UUID"]
    assert_error(client.get(f"/v2/acme/other/blobs/uploads/{upload}"), 404, "BLOB_UPLOAD_UNKNOWN")


def test_manifest_naming_a_blob_the_repository_lacks_is_refused(client: httpx.Client) -> None:
    push_blob(client, "acme/app", EMPTY_CONFIG)
    push_blob(client, "acme/other", b"layer")  # in another repository: does not count
    body = image_manifest(b"layer")
    response = client.put("/v2/acme/app/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(client.get("/v2/acme/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")


def test_manifest_by_digest_must_match_and_too_large_is_refused(client: httpx.Client) -> None:
    push_blob(client, "acme/app", EMPTY_CONFIG)
    push_blob(client, "acme/app", b"layer")
    body = image_manifest(b"layer")
    wrong = client.put(f"/v2/acme/app/manifests/{sha(b'x')}", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert_error(wrong, 400, "DIGEST_INVALID")
    right = client.put(f"/v2/acme/app/manifests/{sha(body)}", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert right.status_code == 201
    huge = client.put("/v2/acme/app/manifests/big", content=b" " * (4 << 20) + b"{}")
    assert_error(huge, 413, "SIZE_INVALID")
    assert_error(client.put("/v2/acme/app/manifests/v2", content=b"[1]"), 400, "MANIFEST_INVALID")


def test_index_needs_its_children_in_the_repository(client: httpx.Client) -> None:
    child = push_image(client, "acme/app", "amd64", b"layer")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 1}],
        }
    ).encode()
    headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
    assert_error(
        client.put("/v2/acme/other/manifests/v1", content=index, headers=headers), 400, "MANIFEST_BLOB_UNKNOWN"
    )
    assert client.put("/v2/acme/app/manifests/v1", content=index, headers=headers).status_code == 201


def test_subject_feeds_the_referrers_api(client: httpx.Client) -> None:
    subject = push_image(client, "acme/app", "v1", b"layer")
    size = len(client.get(f"/v2/acme/app/manifests/{subject}").content)
    push_blob(client, "acme/app", b"signature")
    body = image_manifest(
        b"signature",
        artifactType="application/vnd.example.sig",
        subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": size},
        annotations={"a": "b"},
    )
    response = client.put(f"/v2/acme/app/manifests/{sha(body)}", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert response.headers["OCI-Subject"] == subject
    index = client.get(f"/v2/acme/app/referrers/{subject}").json()
    assert index["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha(body),
            "size": len(body),
            "artifactType": "application/vnd.example.sig",
            "annotations": {"a": "b"},
        }
    ]
    filtered = client.get(f"/v2/acme/app/referrers/{subject}", params={"artifactType": "other"})
    assert filtered.json()["manifests"] == []
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"


def test_tags_list_pages_and_catalog_lists_hosted(client: httpx.Client) -> None:
    for tag in ("a", "b", "c"):
        push_image(client, "acme/app", tag, b"layer")
    page = client.get("/v2/acme/app/tags/list", params={"n": "2"})
    assert page.json()["tags"] == ["a", "b"]
    assert "last=b" in page.headers["Link"]
    assert client.get("/v2/acme/app/tags/list", params={"last": "b"}).json()["tags"] == ["c"]
    assert "acme/app" in client.get("/v2/_catalog").json()["repositories"]


def test_deletes_of_tags_manifests_and_blobs(client: httpx.Client) -> None:
    digest = push_image(client, "acme/app", "v1", b"layer")
    client.put(
        "/v2/acme/app/manifests/v2",
        content=client.get("/v2/acme/app/manifests/v1").content,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert client.delete("/v2/acme/app/manifests/v2").status_code == 202  # the tag only
    assert client.get("/v2/acme/app/tags/list").json()["tags"] == ["v1"]
    assert client.get(f"/v2/acme/app/manifests/{digest}").status_code == 200
    assert client.delete(f"/v2/acme/app/manifests/{digest}").status_code == 202
    assert_error(client.get("/v2/acme/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert_error(client.delete(f"/v2/acme/app/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
    assert client.delete(f"/v2/acme/app/blobs/{sha(b'layer')}").status_code == 202
    assert_error(client.get(f"/v2/acme/app/blobs/{sha(b'layer')}"), 404, "BLOB_UNKNOWN")


def test_mount_from_a_repository_holding_the_blob(client: httpx.Client) -> None:
    push_blob(client, "acme/app", b"shared")
    mounted = client.post("/v2/acme/other/blobs/uploads/", params={"mount": sha(b"shared"), "from": "acme/app"})
    assert mounted.status_code == 201
    assert mounted.headers["Location"] == f"/v2/acme/other/blobs/{sha(b'shared')}"
    assert client.get(f"/v2/acme/other/blobs/{sha(b'shared')}").content == b"shared"
    missing = client.post("/v2/acme/other/blobs/uploads/", params={"mount": sha(b"none"), "from": "acme/app"})
    assert missing.status_code == 202  # a normal upload starts
    assert "Docker-Upload-UUID" in missing.headers


def test_size_quota_answers_denied_naming_it(tmp_path: Path, upstream: MemoryRegistry) -> None:
    for client in hosted_client(tmp_path, upstream, max_size="64KiB"):
        assert push_blob(client, "acme/app", b"x" * 1000).status_code == 201
        refused = push_blob(client, "acme/app", b"y" * (100 << 10))
        error = assert_error(refused, 403, "DENIED")
        assert "max_size" in error["message"]
        assert error["detail"]["limit"] == 64 << 10
        assert error["detail"]["use"] == 1000
        assert_error(client.get(f"/v2/acme/app/blobs/{sha(b'y' * (100 << 10))}"), 404, "BLOB_UNKNOWN")


def test_repository_and_manifest_quotas(tmp_path: Path, upstream: MemoryRegistry) -> None:
    for client in hosted_client(tmp_path, upstream, max_repositories=1, max_manifests_per_repository=1):
        push_image(client, "acme/app", "v1", b"layer")
        error = assert_error(push_blob(client, "acme/other", b"x"), 403, "DENIED")
        assert "max_repositories" in error["message"]
        push_blob(client, "acme/app", b"layer2")
        body = image_manifest(b"layer2")
        refused = client.put("/v2/acme/app/manifests/v2", content=body, headers={"Content-Type": OCI_MANIFEST})
        assert "max_manifests_per_repository" in assert_error(refused, 403, "DENIED")["message"]


def test_uploads_in_progress_count_against_max_size(tmp_path: Path, upstream: MemoryRegistry) -> None:
    for client in hosted_client(tmp_path, upstream, max_size="64KiB"):
        location = client.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        assert client.patch(location, content=b"a" * (40 << 10)).status_code == 202
        refused = push_blob(client, "acme/app", b"b" * (40 << 10))
        assert "max_size" in assert_error(refused, 403, "DENIED")["message"]
        over = client.patch(location, content=b"a" * (40 << 10))
        assert_error(over, 403, "DENIED")
        assert client.get(location).headers["Range"] == f"0-{(40 << 10) - 1}"  # as it was before the chunk
        assert client.delete(location).status_code == 204
        assert push_blob(client, "acme/app", b"b" * (40 << 10)).status_code == 201


def test_a_blob_both_cached_and_hosted_is_stored_once_and_outlives_eviction(
    client: httpx.Client, upstream: MemoryRegistry, tmp_path: Path
) -> None:
    data = b"cached and pushed" * 1000
    digest = upstream.add_blob("team/base", data)
    assert client.get(f"/v2/team/base/blobs/{digest}").content == data  # now in the cache
    assert push_blob(client, "acme/app", data).status_code == 201
    cache = DiskContentStore(tmp_path, 1 << 40)
    hosted = DiskContentStore(tmp_path / "hosted", 1 << 40)
    try:
        cached, kept = cache.find_blob(digest), hosted.find_blob(digest)
        assert cached is not None and kept is not None
        assert os.stat(cached.path).st_ino == os.stat(kept.path).st_ino  # one file, two names
        assert cache.remove(digest)  # as the LRU would evict it
    finally:
        cache.close()
        hosted.close()
    assert client.get(f"/v2/acme/app/blobs/{digest}").content == data


def test_mount_from_a_cached_repository_the_caller_may_pull(client: httpx.Client, upstream: MemoryRegistry) -> None:
    data = b"base layer" * 1000
    digest = upstream.add_blob("team/base", data)
    params = {"mount": digest, "from": "team/base"}
    assert client.post("/v2/acme/app/blobs/uploads/", params=params).status_code == 202  # not cached yet
    asked = len(upstream.requests)
    assert client.get(f"/v2/team/base/blobs/{digest}").content == data
    mounted = client.post("/v2/acme/app/blobs/uploads/", params=params)
    assert mounted.status_code == 201
    assert client.get(f"/v2/acme/app/blobs/{digest}").content == data
    other = client.post("/v2/acme/app/blobs/uploads/", params={"mount": digest, "from": "team/other"})
    assert other.status_code == 202  # that repository is not known to hold it
    assert len(upstream.requests) == asked + 1  # the pull only: mounts ask no upstream


def _age_links(directory: Path, seconds: float) -> None:
    """Make every blob link look `seconds` older, as if pushed that long ago."""
    with sqlite3.connect(directory / "hosted" / "index.sqlite") as db:
        db.execute("UPDATE blobs SET linked = linked - ?", (seconds,))


def _collect(directory: Path) -> int:
    """One garbage collection, as `pullproxy gc` or another worker runs it."""
    store = HostedRepositories(Hosted(repositories=("acme/**",)), directory / "hosted")
    try:
        return store.collect().blobs
    finally:
        store.close()


@pytest.mark.parametrize("found_by", ["HEAD", "GET", "mount"])
def test_gc_between_a_client_finding_old_blobs_and_its_manifest_put_keeps_them(
    tmp_path: Path, client: httpx.Client, found_by: str
) -> None:
    layer = b"old unreferenced layer"
    repo = "acme/other" if found_by == "mount" else "acme/app"
    for data in (EMPTY_CONFIG, layer):
        assert push_blob(client, "acme/app", data).status_code == 201
    _age_links(tmp_path, 7200)  # older than upload_ttl, and no manifest names them
    for data in (EMPTY_CONFIG, layer):
        if found_by == "mount":
            params = {"mount": sha(data), "from": "acme/app"}
            assert client.post(f"/v2/{repo}/blobs/uploads/", params=params).status_code == 201
        else:
            assert client.request(found_by, f"/v2/{repo}/blobs/{sha(data)}").status_code == 200
    _collect(tmp_path)
    put = client.put(f"/v2/{repo}/manifests/v1", content=image_manifest(layer), headers={"Content-Type": OCI_MANIFEST})
    assert put.status_code == 201, put.text


def test_gc_still_removes_old_blobs_nobody_asked_for(tmp_path: Path, client: httpx.Client) -> None:
    layer = b"old unreferenced layer"
    for data in (EMPTY_CONFIG, layer):
        assert push_blob(client, "acme/app", data).status_code == 201
    _age_links(tmp_path, 7200)
    assert _collect(tmp_path) == 2
    put = client.put("/v2/acme/app/manifests/v1", content=image_manifest(layer), headers={"Content-Type": OCI_MANIFEST})
    assert_error(put, 400, "MANIFEST_BLOB_UNKNOWN")


def test_upload_ttl_counts_from_the_last_chunk_not_the_start(tmp_path: Path, upstream: MemoryRegistry) -> None:
    """A slow chunked push outlives `upload_ttl` as long as chunks keep coming; an idle one does not."""
    chunks = [bytes([i]) * 1000 for i in range(6)]
    for client in hosted_client(tmp_path, upstream, upload_ttl="2s"):
        location = client.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        idle = client.post("/v2/acme/app/blobs/uploads/").headers["Location"]
        begun = time.monotonic()
        for chunk in chunks:  # 3 s in all, past the ttl; each PATCH renews it
            time.sleep(0.5)
            assert client.patch(location, content=chunk).status_code == 202
            assert client.post("/v2/acme/other/blobs/uploads/").status_code == 202  # each start sweeps
        assert time.monotonic() - begun > 2.5
        data = b"".join(chunks)
        done = client.put(location, params={"digest": sha(data)})
        assert done.status_code == 201, done.text
        assert client.get(f"/v2/acme/app/blobs/{sha(data)}").content == data
        assert_error(client.get(idle), 404, "BLOB_UPLOAD_UNKNOWN")  # started as long ago, never written to


def test_deleting_a_child_an_index_names_is_allowed_and_leaves_the_index_dangling(
    tmp_path: Path, client: httpx.Client
) -> None:
    """As distribution does and the spec's content management asks (202, then 404 for it): a
    delete is not refused because an index names the manifest. The index stays as pushed; its
    child answers MANIFEST_UNKNOWN until pushed again, and gc takes what only the child needed."""
    layer = b"amd64 layer"
    child = push_image(client, "acme/multi", "amd64", layer)
    child_body = client.get(f"/v2/acme/multi/manifests/{child}").content
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": len(child_body)}],
        }
    ).encode()
    headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
    assert client.put("/v2/acme/multi/manifests/v1", content=index, headers=headers).status_code == 201

    assert client.delete(f"/v2/acme/multi/manifests/{child}").status_code == 202
    assert_error(client.get(f"/v2/acme/multi/manifests/{child}"), 404, "MANIFEST_UNKNOWN")
    assert_error(client.get("/v2/acme/multi/manifests/amd64"), 404, "MANIFEST_UNKNOWN")  # its tag went with it
    dangling = client.get("/v2/acme/multi/manifests/v1")
    assert (dangling.status_code, dangling.content) == (200, index)
    assert client.get("/v2/acme/multi/tags/list").json()["tags"] == ["v1"]

    _age_links(tmp_path, 7200)
    assert _collect(tmp_path) == 2  # the child's config and layer: the index names no blob
    assert client.get("/v2/acme/multi/manifests/v1").content == index  # gc leaves the index alone

    push_blob(client, "acme/multi", EMPTY_CONFIG)
    push_blob(client, "acme/multi", layer)
    again = client.put(f"/v2/acme/multi/manifests/{child}", content=child_body, headers={"Content-Type": OCI_MANIFEST})
    assert again.status_code == 201  # pushed again, the index is whole again
    assert client.get(f"/v2/acme/multi/manifests/{child}").content == child_body
