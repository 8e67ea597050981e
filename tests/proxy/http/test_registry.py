"""The V2 read API's edges: OCI error envelopes, headers, ranges, pagination, bad input."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.support.faulty import OCI_INDEX, OCI_MANIFEST, FaultyRegistry
from tests.support.proxy import Proxy


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        yield c


def error_code(response: httpx.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json")
    errors = response.json()["errors"]
    assert errors[0]["message"]
    return errors[0]["code"]


def test_base_endpoint_announces_the_api_version(client: httpx.Client) -> None:
    response = client.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("name", ["Upper/case", "a//b", "-lead", "trail-/x", "a" * 256, "x/../y"])
def test_invalid_repository_name_is_name_invalid(client: httpx.Client, name: str) -> None:
    response = client.get(f"/v2/{name}/manifests/latest")
    assert response.status_code in (400, 404)
    if response.status_code == 400:
        assert error_code(response) == "NAME_INVALID"


@pytest.mark.parametrize("digest", ["sha256:abc", "sha256:" + "g" * 64, "md5:" + "0" * 32, "sha256:" + "A" * 64])
def test_malformed_digest_is_digest_invalid(client: httpx.Client, digest: str) -> None:
    for path in (f"/v2/acme/app/blobs/{digest}", f"/v2/acme/app/manifests/{digest}"):
        response = client.get(path)
        assert response.status_code == 400
        assert error_code(response) == "DIGEST_INVALID"
    assert client.head(f"/v2/acme/app/blobs/{digest}").status_code == 400


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/acme/app/blobs/uploads/"),
        ("PUT", "/v2/acme/app/manifests/latest"),
        ("DELETE", "/v2/acme/app/manifests/sha256:" + "0" * 64),
        ("PATCH", "/v2/acme/app/blobs/uploads/some-uuid"),
        ("DELETE", "/v2/acme/app/blobs/sha256:" + "0" * 64),
    ],
)
def test_push_methods_are_unsupported(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path, content=b"x")
    assert response.status_code == 405
    assert error_code(response) == "UNSUPPORTED"


def test_unknown_manifest_and_blob(client: httpx.Client, faulty: FaultyRegistry) -> None:
    missing = client.get("/v2/acme/nothing/manifests/latest")
    assert missing.status_code == 404
    assert error_code(missing) == "MANIFEST_UNKNOWN"
    blob = client.get("/v2/acme/nothing/blobs/sha256:" + "1" * 64)
    assert blob.status_code == 404
    assert error_code(blob) == "BLOB_UNKNOWN"
    assert client.head("/v2/acme/nothing/blobs/sha256:" + "1" * 64).status_code == 404


def test_manifest_headers_on_get_and_head(client: httpx.Client, faulty: FaultyRegistry) -> None:
    digest, _ = faulty.add_image("acme/headers", "v1")
    for method in ("GET", "HEAD"):
        for reference in ("v1", digest):
            response = client.request(method, f"/v2/acme/headers/manifests/{reference}")
            assert response.status_code == 200
            assert response.headers["Docker-Content-Digest"] == digest
            assert response.headers["Content-Type"] == OCI_MANIFEST
            assert int(response.headers["Content-Length"]) > 0
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_index_keeps_its_media_type(client: httpx.Client, faulty: FaultyRegistry) -> None:
    child, _ = faulty.add_image("acme/multi", None)
    index = faulty.add_index("acme/multi", "latest", [child])
    response = client.get("/v2/acme/multi/manifests/latest")
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.headers["Docker-Content-Digest"] == index


def test_several_accept_lines_are_merged_and_upstream_gets_every_manifest_type(
    client: httpx.Client, faulty: FaultyRegistry
) -> None:
    faulty.add_image("acme/accept", "v1")
    faulty.reset_log()
    headers = [("Accept", OCI_MANIFEST), ("Accept", "application/vnd.docker.distribution.manifest.v2+json")]
    assert client.get("/v2/acme/accept/manifests/v1", headers=headers).status_code == 200
    asked = [r.headers.get("accept", "") for r in faulty.requests() if "/manifests/" in r.path]
    assert asked
    for accept in asked:
        for media_type in (OCI_MANIFEST, OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"):
            assert media_type in accept


def test_blob_headers_and_single_range(client: httpx.Client, faulty: FaultyRegistry) -> None:
    _, (_, layer) = faulty.add_image("acme/range", "v1", layer_sizes=[5000])
    data = faulty.blob(layer)
    head = client.head(f"/v2/acme/range/blobs/{layer}")
    assert head.headers["Content-Length"] == "5000"
    assert head.headers["Docker-Content-Digest"] == layer
    full = client.get(f"/v2/acme/range/blobs/{layer}")
    assert full.content == data
    assert full.headers["Content-Length"] == "5000"
    for header, expected, content_range in (
        ("bytes=0-99", data[:100], "bytes 0-99/5000"),
        ("bytes=4900-", data[4900:], "bytes 4900-4999/5000"),
        ("bytes=-10", data[-10:], "bytes 4990-4999/5000"),
        ("bytes=4990-9999", data[4990:], "bytes 4990-4999/5000"),
    ):
        partial = client.get(f"/v2/acme/range/blobs/{layer}", headers={"Range": header})
        assert partial.status_code == 206, header
        assert partial.content == expected
        assert partial.headers["Content-Range"] == content_range
    unsatisfiable = client.get(f"/v2/acme/range/blobs/{layer}", headers={"Range": "bytes=6000-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["Content-Range"] == "bytes */5000"


def test_blob_bytes_are_never_recompressed(client: httpx.Client, faulty: FaultyRegistry) -> None:
    _, (_, layer) = faulty.add_image("acme/gzip", "v1", layer_sizes=[20000])
    response = client.get(f"/v2/acme/gzip/blobs/{layer}", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in response.headers
    assert response.content == faulty.blob(layer)


def test_tags_list_paginates_with_a_link_to_the_mirror(client: httpx.Client, faulty: FaultyRegistry) -> None:
    for tag in ("a", "b", "c", "d", "e"):
        faulty.add_image("acme/tags", tag, layer_sizes=[10])
    first = client.get("/v2/acme/tags/tags/list", params={"n": "2"})
    assert first.json() == {"name": "acme/tags", "tags": ["a", "b"]}
    link = first.headers["Link"]
    assert link.startswith("</v2/acme/tags/tags/list?") and 'rel="next"' in link
    second = client.get(link[1 : link.index(">")])
    assert second.json()["tags"] == ["c", "d"]
    everything = client.get("/v2/acme/tags/tags/list")
    assert everything.json()["tags"] == ["a", "b", "c", "d", "e"]
    assert "Link" not in everything.headers
    assert client.get("/v2/acme/tags/tags/list", params={"n": "many"}).status_code == 400


def test_tags_list_of_unknown_repository(client: httpx.Client) -> None:
    response = client.get("/v2/acme/none/tags/list")
    assert response.status_code == 404
    assert error_code(response) == "NAME_UNKNOWN"


def test_tls_handshake_on_the_plain_port_is_refused_and_the_server_keeps_serving(proxy: Proxy) -> None:
    client_hello = bytes.fromhex("160301002a0100002603035a") + b"\x00" * 40
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(client_hello)
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
    assert httpx.get(f"{proxy.url}/v2/", timeout=5).status_code == 200
