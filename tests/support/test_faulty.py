"""Pin that every FaultyRegistry knob really produces its fault, using plain httpx.

If the fake silently stopped injecting a fault, the mirror tests relying on it would
pass for the wrong reason; these tests keep it honest. Every request carries a short
timeout so no test can hang.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.faulty import OCI_INDEX, OCI_MANIFEST, FaultyRegistry, sha256_digest

TIMEOUT = httpx.Timeout(5.0)
NAME = "library/alpine"


@pytest.fixture
def reg() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture
def client(reg: FaultyRegistry) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=reg.url, timeout=TIMEOUT) as c:
        yield c


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


# ---------------------------------------------------------------------- plain API


def test_serves_manifests_blobs_and_headers(reg: FaultyRegistry, client: httpx.Client) -> None:
    manifest_digest, blobs = reg.add_image(NAME, "3.19", layer_sizes=[10, 5000])
    assert len(blobs) == 3

    assert client.get("/v2/").headers["docker-distribution-api-version"] == "registry/2.0"
    by_tag = client.get(f"/v2/{NAME}/manifests/3.19")
    assert by_tag.status_code == 200
    assert by_tag.headers["content-type"] == OCI_MANIFEST
    assert by_tag.headers["docker-content-digest"] == manifest_digest
    assert sha256_digest(by_tag.content) == manifest_digest
    assert int(by_tag.headers["content-length"]) == len(by_tag.content)
    assert client.get(f"/v2/{NAME}/manifests/{manifest_digest}").content == by_tag.content

    head = client.head(f"/v2/{NAME}/manifests/3.19")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(by_tag.content))
    assert head.headers["docker-content-digest"] == manifest_digest

    layers = [entry["digest"] for entry in by_tag.json()["layers"]]
    assert layers == blobs[1:]
    for digest in blobs:
        blob = client.get(f"/v2/{NAME}/blobs/{digest}")
        assert blob.status_code == 200 and sha256_digest(blob.content) == digest
        assert blob.headers["docker-content-digest"] == digest
        assert client.head(f"/v2/{NAME}/blobs/{digest}").headers["content-length"] == str(len(blob.content))

    missing = "sha256:" + "0" * 64
    assert client.get(f"/v2/{NAME}/blobs/{missing}").json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert client.get(f"/v2/{NAME}/manifests/nope").json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert client.get("/v2/no/such/manifests/latest").json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert client.get(f"/v2/{NAME}/referrers/{manifest_digest}").status_code == 404


def test_content_is_deterministic_and_index_and_retag_work() -> None:
    with FaultyRegistry() as a, FaultyRegistry() as b:
        assert a.add_image(NAME, "x", [300]) == b.add_image(NAME, "x", [300])
    with FaultyRegistry() as reg, httpx.Client(base_url=reg.url, timeout=TIMEOUT) as client:
        first, _ = reg.add_image(NAME, "latest", [10])
        second, _ = reg.add_image(NAME, "other", [20])
        index = reg.add_index(NAME, "multi", [first, second])
        resp = client.get(f"/v2/{NAME}/manifests/multi")
        assert resp.headers["content-type"] == OCI_INDEX
        assert [m["digest"] for m in resp.json()["manifests"]] == [first, second]
        assert resp.headers["docker-content-digest"] == index

        reg.add_manifest(NAME, "latest", resp.content, OCI_INDEX)  # tag moved upstream
        assert client.get(f"/v2/{NAME}/manifests/latest").headers["docker-content-digest"] == index
        reg.delete_tag(NAME, "latest")
        assert client.get(f"/v2/{NAME}/manifests/latest").status_code == 404
        assert client.get(f"/v2/{NAME}/manifests/{first}").status_code == 200


def test_range_requests(reg: FaultyRegistry, client: httpx.Client) -> None:
    data = bytes(range(256)) * 4
    digest = reg.add_blob(data)
    url = f"/v2/{NAME}/blobs/{digest}"

    part = client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert client.get(url, headers={"Range": "bytes=1000-"}).content == data[1000:]
    assert client.get(url, headers={"Range": "bytes=-4"}).content == data[-4:]
    assert client.get(url, headers={"Range": "bytes=0-99999"}).content == data
    unsatisfiable = client.get(url, headers={"Range": "bytes=5000-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{len(data)}"
    assert client.get(url, headers={"Range": "bytes=0-1,5-6"}).status_code == 200  # multi-range ignored


def test_tags_pagination_with_link_header(reg: FaultyRegistry, client: httpx.Client) -> None:
    for tag in ["c", "a", "e", "b", "d"]:
        reg.add_image(NAME, tag, [8])
    assert client.get(f"/v2/{NAME}/tags/list").json() == {"name": NAME, "tags": ["a", "b", "c", "d", "e"]}

    seen: list[str] = []
    url: str | None = f"/v2/{NAME}/tags/list?n=2"
    while url:
        resp = client.get(url)
        seen += resp.json()["tags"]
        link = resp.headers.get("link")
        url = re.fullmatch(r'<([^>]+)>; rel="next"', link)[1] if link else None  # type: ignore[index]
        assert len(seen) <= 5
    assert seen == ["a", "b", "c", "d", "e"]
    assert client.get(f"/v2/{NAME}/tags/list?n=2&last=b").headers["link"] == (
        f'</v2/{NAME}/tags/list?n=2&last=d>; rel="next"'
    )
    assert "link" not in client.get(f"/v2/{NAME}/tags/list?n=2&last=c").headers

    reg.tags_page_size = 3  # server-side cap, even when the client asks for everything
    capped = client.get(f"/v2/{NAME}/tags/list")
    assert capped.json()["tags"] == ["a", "b", "c"] and "last=c" in capped.headers["link"]


# ---------------------------------------------------------------------- byte faults


def test_corrupt_serves_same_length_wrong_bytes(reg: FaultyRegistry, client: httpx.Client) -> None:
    manifest, blobs = reg.add_image(NAME, "latest", [4096, 100])
    bad, good = blobs[1], blobs[2]
    fault = reg.corrupt(bad, times=1)

    assert client.head(f"/v2/{NAME}/blobs/{bad}").status_code == 200  # HEAD does not use it up
    served = client.get(f"/v2/{NAME}/blobs/{bad}")
    assert served.status_code == 200
    assert served.headers["docker-content-digest"] == bad  # the lie: header claims the true digest
    assert len(served.content) == len(reg.blob(bad))
    assert sha256_digest(served.content) != bad
    assert fault.hits == 1 and fault.times == 0
    assert sha256_digest(client.get(f"/v2/{NAME}/blobs/{bad}").content) == bad  # only once
    assert sha256_digest(client.get(f"/v2/{NAME}/blobs/{good}").content) == good

    reg.corrupt(manifest)  # digest-keyed faults also catch by-tag pulls
    by_tag = client.get(f"/v2/{NAME}/manifests/latest")
    assert by_tag.headers["docker-content-digest"] == manifest
    assert sha256_digest(by_tag.content) != manifest

    reg.corrupt(good)
    ranged = client.get(f"/v2/{NAME}/blobs/{good}", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and len(ranged.content) == 10
    assert ranged.content != reg.blob(good)[10:20]
    reg.clear_faults()
    assert sha256_digest(client.get(f"/v2/{NAME}/manifests/latest").content) == manifest


def test_truncate_really_truncates(reg: FaultyRegistry, client: httpx.Client) -> None:
    digest = reg.add_blob(b"x" * 200_000)
    reg.truncate(digest, keep=12_345, times=1)

    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError, match=r"complete message body"),
        client.stream("GET", f"/v2/{NAME}/blobs/{digest}") as resp,
    ):
        assert resp.headers["content-length"] == "200000"
        for chunk in resp.iter_bytes():
            received += chunk
    assert len(received) == 12_345

    default = reg.truncate(digest)  # default: half the body, until cleared
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"/v2/{NAME}/blobs/{digest}")
    assert default.hits == 2
    reg.remove_fault(default)
    assert len(client.get(f"/v2/{NAME}/blobs/{digest}").content) == 200_000


def test_truncate_with_reset_errors(reg: FaultyRegistry, client: httpx.Client) -> None:
    digest = reg.add_blob(b"y" * 100_000)
    reg.truncate(digest, keep=10, reset=True)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get(f"/v2/{NAME}/blobs/{digest}")


def test_endless_sends_until_its_bound_or_until_the_client_hangs_up(reg: FaultyRegistry, client: httpx.Client) -> None:
    whole = reg.endless(path="/tags/list", prefix=b"[", filler=b"ab" * 500, total=100_000, times=1)
    answer = client.get(f"/v2/{NAME}/tags/list")
    assert "content-length" not in answer.headers and answer.headers["transfer-encoding"] == "chunked"
    assert answer.content == (b"[" + b"ab" * 50_000)[:100_000] and whole.sent == 100_000

    declared = reg.endless(status=401, headers={"WWW-Authenticate": "Bearer x"}, total=8 << 20, declare_length=True)
    with client.stream("GET", f"/v2/{NAME}/manifests/1") as resp:
        assert resp.status_code == 401 and resp.headers["content-length"] == str(8 << 20)
        next(resp.iter_raw())  # read a little, then hang up
    deadline = time.monotonic() + 5
    while reg.active_connections("registry") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert declared.hits == 1 and 0 < declared.sent < 8 << 20


def test_slow_body_and_slow_headers(reg: FaultyRegistry, client: httpx.Client) -> None:
    digest = reg.add_blob(b"z" * 4000)
    reg.slow(digest=digest, chunk_size=1000, chunk_delay=0.1, times=1)
    arrivals: list[float] = []
    start = time.monotonic()
    with client.stream("GET", f"/v2/{NAME}/blobs/{digest}") as resp:
        for _ in resp.iter_raw():
            arrivals.append(time.monotonic() - start)
    assert arrivals[-1] >= 0.3  # four chunks, three gaps of 0.1 s
    assert len(arrivals) >= 2

    reg.slow(digest=digest, chunk_size=2000, bytes_per_sec=10_000, times=1)  # 0.2 s between chunks
    start = time.monotonic()
    assert len(client.get(f"/v2/{NAME}/blobs/{digest}").content) == 4000
    assert time.monotonic() - start >= 0.2

    reg.slow(method="HEAD", path="/blobs/", header_delay=1.0, times=1)
    with pytest.raises(httpx.ReadTimeout):
        client.head(f"/v2/{NAME}/blobs/{digest}", timeout=0.3)
    start = time.monotonic()
    assert client.head(f"/v2/{NAME}/blobs/{digest}").status_code == 200
    assert time.monotonic() - start < 0.5  # times=1 consumed


# ---------------------------------------------------------------------- status, drop, down


def test_status_override_matches_method_and_path_for_n_requests(reg: FaultyRegistry, client: httpx.Client) -> None:
    digest, _ = reg.add_image(NAME, "latest", [10])
    fault = reg.fail(503, method="HEAD", path=f"/{NAME}/manifests/latest", times=2)

    assert client.get(f"/v2/{NAME}/manifests/latest").status_code == 200  # GET untouched
    assert client.head(f"/v2/{NAME}/manifests/{digest}").status_code == 200  # by digest untouched
    assert [client.head(f"/v2/{NAME}/manifests/latest").status_code for _ in range(3)] == [503, 503, 200]
    assert fault.hits == 2

    forever = reg.fail(502, path=re.compile(r"/blobs/"))
    for _ in range(3):
        assert client.get(f"/v2/{NAME}/blobs/{reg.add_blob(b'q')}").status_code == 502
    reg.remove_fault(forever)
    assert client.get(f"/v2/{NAME}/blobs/{reg.add_blob(b'q')}").status_code == 200

    reg.fail(500, times=1)  # global
    assert client.get("/v2/").status_code == 500
    assert client.get("/v2/").status_code == 200


def test_429_carries_retry_after(reg: FaultyRegistry, client: httpx.Client) -> None:
    reg.add_image(NAME, "latest", [10])
    reg.fail(429, path="/manifests/", times=1)
    resp = client.get(f"/v2/{NAME}/manifests/latest")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    reg.fail(429, retry_after=7, times=1)
    assert client.get("/v2/").headers["retry-after"] == "7"
    reg.fail(503, retry_after=2, times=1)
    assert client.get("/v2/").headers["retry-after"] == "2"


def test_drop_closes_without_response(reg: FaultyRegistry, client: httpx.Client) -> None:
    reg.drop(path="/v2/", times=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get("/v2/")
    assert client.get("/v2/").status_code == 200


def test_down_and_back_up_on_same_port(reg: FaultyRegistry) -> None:
    url = reg.url
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(f"{url}/v2/").status_code == 200  # keeps a pooled connection open
        assert reg.active_connections("registry") == 1
        reg.stop()
        assert not reg.running
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
            client.get(f"{url}/v2/")
        with pytest.raises(httpx.ConnectError):
            client.get(f"{url}/v2/")
        reg.start()
        assert reg.url == url
        assert client.get(f"{url}/v2/").status_code == 200


def test_stop_releases_ports() -> None:
    reg = FaultyRegistry()
    with reg:
        port = int(reg.host.rsplit(":", 1)[1])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # would fail if the listener leaked
    reg.stop()  # idempotent


# ---------------------------------------------------------------------- auth


def test_bearer_token_flow_is_scoped() -> None:
    with (
        FaultyRegistry(auth="bearer", token_credentials=("alice", "pw")) as reg,
        httpx.Client(timeout=TIMEOUT) as client,
    ):
        reg.add_image(NAME, "latest", [10])
        reg.add_image("other/repo", "latest", [10])
        assert reg.token_url.rsplit("/", 1)[0] not in (reg.url, reg.cdn_url)

        base = client.get(f"{reg.url}/v2/")
        assert base.status_code == 401
        scheme, params = parse_challenge(base.headers["www-authenticate"])
        assert scheme == "Bearer" and params == {"realm": reg.token_url, "service": "faulty.test"}

        denied = client.get(f"{reg.url}/v2/{NAME}/manifests/latest")
        assert denied.status_code == 401
        _, params = parse_challenge(denied.headers["www-authenticate"])
        assert params["scope"] == f"repository:{NAME}:pull"

        query = {"service": params["service"], "scope": params["scope"]}
        assert client.get(params["realm"], params=query).status_code == 401  # creds required
        assert client.get(params["realm"], params=query, auth=("alice", "wrong")).status_code == 401
        assert client.get(params["realm"], params={"scope": params["scope"]}, auth=("alice", "pw")).status_code == 400
        token_resp = client.get(params["realm"], params=query, auth=("alice", "pw"))
        assert token_resp.status_code == 200
        body = token_resp.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300 and body["issued_at"]
        bearer = {"Authorization": f"Bearer {body['token']}"}

        assert client.get(f"{reg.url}/v2/{NAME}/manifests/latest", headers=bearer).status_code == 200
        assert client.get(f"{reg.url}/v2/", headers=bearer).status_code == 200
        other = client.get(f"{reg.url}/v2/other/repo/manifests/latest", headers=bearer)
        assert other.status_code == 401
        _, params = parse_challenge(other.headers["www-authenticate"])
        assert params["error"] == "insufficient_scope" and params["scope"] == "repository:other/repo:pull"

        push_only = client.get(
            reg.token_url,
            params={"service": "faulty.test", "scope": "repository:other/repo:push"},
            auth=("alice", "pw"),
        ).json()["token"]
        headers = {"Authorization": f"Bearer {push_only}"}
        assert client.get(f"{reg.url}/v2/other/repo/manifests/latest", headers=headers).status_code == 401

        reg.invalidate_tokens()
        expired = client.get(f"{reg.url}/v2/{NAME}/manifests/latest", headers=bearer)
        assert expired.status_code == 401
        assert parse_challenge(expired.headers["www-authenticate"])[1]["error"] == "invalid_token"
        assert reg.count("GET", "/token", listener="token") == 5


def test_bearer_tokens_expire() -> None:
    with FaultyRegistry(auth="bearer", token_expires_in=1) as reg, httpx.Client(timeout=TIMEOUT) as client:
        reg.add_image(NAME, "latest", [10])
        token = client.get(reg.token_url, params={"service": "faulty.test", "scope": f"repository:{NAME}:pull"}).json()
        assert token["expires_in"] == 1
        headers = {"Authorization": f"Bearer {token['token']}"}
        assert client.get(f"{reg.url}/v2/{NAME}/manifests/latest", headers=headers).status_code == 200
        time.sleep(1.1)
        assert client.get(f"{reg.url}/v2/{NAME}/manifests/latest", headers=headers).status_code == 401


def test_basic_auth_mode() -> None:
    with (
        FaultyRegistry(auth="basic", credentials=("bob", "hunter2")) as reg,
        httpx.Client(base_url=reg.url, timeout=TIMEOUT) as client,
    ):
        resp = client.get("/v2/")
        assert resp.status_code == 401
        assert parse_challenge(resp.headers["www-authenticate"])[0] == "Basic"
        assert client.get("/v2/", auth=("bob", "nope")).status_code == 401
        assert client.get("/v2/", auth=("bob", "hunter2")).status_code == 200


# ---------------------------------------------------------------------- CDN redirect


def test_blob_redirect_to_cdn_records_authorization() -> None:
    with FaultyRegistry(auth="basic", redirect_blobs=True) as reg, httpx.Client(timeout=TIMEOUT) as client:
        _, blobs = reg.add_image(NAME, "latest", [3000])
        layer = blobs[1]
        auth = ("user", "secret")

        redirect = client.get(f"{reg.url}/v2/{NAME}/blobs/{layer}", auth=auth)
        assert redirect.status_code == 307
        location = redirect.headers["location"]
        assert location.startswith(reg.cdn_url + "/blobs/")

        # httpx drops Authorization on a cross-origin redirect: the correct behaviour.
        followed = client.get(f"{reg.url}/v2/{NAME}/blobs/{layer}", auth=auth, follow_redirects=True)
        assert sha256_digest(followed.content) == layer
        assert reg.cdn_authorization_headers() == []
        assert reg.gets(layer) == 1  # counted at the CDN only

        # A client that forwards the registry credentials gets caught (and rejected, like S3).
        leaked = client.get(location, headers={"Authorization": "Bearer leaked"})
        assert leaked.status_code == 400
        assert reg.cdn_authorization_headers() == ["Bearer leaked"]

        tampered = location.replace("sig=", "sig=0")
        assert client.get(tampered).status_code == 403
        ranged = client.get(location, headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206 and ranged.content == reg.blob(layer)[:10]

        reg.corrupt(layer, times=1)  # faults keyed by digest apply at the CDN too
        assert hashlib.sha256(client.get(location).content).hexdigest() != layer.split(":")[1]
        assert reg.count("GET", layer, listener="cdn") == 5


# ---------------------------------------------------------------------- observability


def test_counts_log_and_connections(reg: FaultyRegistry) -> None:
    manifest, blobs = reg.add_image(NAME, "latest", [10])
    with httpx.Client(base_url=reg.url, timeout=TIMEOUT) as client:
        client.get(f"/v2/{NAME}/manifests/latest", headers={"Accept": OCI_MANIFEST})
        client.head(f"/v2/{NAME}/manifests/latest")
        client.get(f"/v2/{NAME}/manifests/{manifest}")
        client.get(f"/v2/{NAME}/blobs/{blobs[1]}?x=1")
        assert reg.active_connections() == 1

    assert reg.count("GET", "/manifests/") == 2
    assert reg.count("HEAD", "/manifests/latest") == 1
    assert reg.count(None, "/manifests/") == 3
    assert reg.gets(manifest) == 2  # by tag and by digest; HEAD is not a served body
    assert reg.gets(blobs[1]) == 1 and reg.gets(blobs[0]) == 0
    log = reg.requests()
    method, path, _query, headers = log[0]
    assert (method, path, headers["accept"]) == ("GET", f"/v2/{NAME}/manifests/latest", OCI_MANIFEST)
    assert log[-1].query == "x=1"
    assert reg.total_connections() == 1 and reg.total_connections("cdn") == 0

    deadline = time.monotonic() + 2
    while reg.active_connections() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reg.active_connections() == 0

    reg.reset_log()
    assert reg.requests() == [] and reg.total_connections() == 0 and reg.gets(manifest) == 0
    assert reg.count("GET", "") == 0
