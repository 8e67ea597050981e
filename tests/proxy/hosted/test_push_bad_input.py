"""Bad pushes get an OCI error with a 4xx, never a 500: arbitrary bodies, headers, references and queries."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.hosted.test_push_api import EMPTY_CONFIG, hosted_client, push_blob, sha
from tests.support.inprocess import MemoryRegistry

TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
NAMES = st.sampled_from(["acme/app", "acme/App", "acme//x", "charts/x/y", "acme/" + "a" * 300])
REFERENCES = st.one_of(st.sampled_from(["v1", sha(b"x"), "sha256:1", "sha999:" + "a" * 64, "-bad", "a" * 200]), TEXT)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"{}",
            b"null",
            b'{"layers": "x"}',
            b'{"layers": [{"digest": 5}]}',
            b'{"manifests": [{"digest": "sha256:1"}]}',
            b'{"subject": {"digest": "nope"}, "config": []}',
            b'{"mediaType": 7}',
        ]
    ),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    yield from hosted_client(tmp_path_factory.mktemp("fuzz"), MemoryRegistry(), max_size="1MiB")


@pytest.fixture(scope="module")
def upload(client: httpx.Client) -> str:
    push_blob(client, "acme/app", EMPTY_CONFIG)
    return str(client.post("/v2/acme/app/blobs/uploads/").headers["Location"])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_push_makes_any_route_fail_with_a_5xx(client: httpx.Client, upload: str, data: st.DataObject) -> None:
    name = data.draw(NAMES)
    kind = data.draw(st.sampled_from(["manifest", "post", "upload", "delete"]))
    headers = {}
    if data.draw(st.booleans()):
        headers["Content-Type"] = data.draw(TEXT)
    if data.draw(st.booleans()):
        headers["Content-Range"] = data.draw(st.one_of(TEXT, st.sampled_from(["0-0", "5-3", "0-99999999999999999999"])))
    params = {
        key: data.draw(TEXT) for key in data.draw(st.sets(st.sampled_from(["digest", "mount", "from", "n", "last"])))
    }
    body = data.draw(BODIES)
    if kind == "manifest":
        request = client.build_request(
            "PUT", f"/v2/{name}/manifests/{quote(data.draw(REFERENCES), safe=':')}", content=body, headers=headers
        )
    elif kind == "post":
        request = client.build_request(
            "POST", f"/v2/{name}/blobs/uploads/", params=params, content=body, headers=headers
        )
    elif kind == "upload":
        method = data.draw(st.sampled_from(["PATCH", "PUT", "GET"]))
        path = upload if data.draw(st.booleans()) else f"/v2/{name}/blobs/uploads/{quote(data.draw(TEXT), safe='')}"
        request = client.build_request(method, path, params=params, content=body, headers=headers)
    else:
        segment = data.draw(st.sampled_from(["manifests", "blobs"]))
        request = client.build_request("DELETE", f"/v2/{name}/{segment}/{quote(data.draw(REFERENCES), safe=':')}")
    response = client.send(request)
    assert response.status_code < 500, (request.method, request.url, response.text[:500])
    if response.status_code >= 400 and request.method != "HEAD":
        assert response.json()["errors"][0]["code"]


def test_an_upload_id_naming_another_file_is_unknown(client: httpx.Client) -> None:
    for upload in ("..%2F..%2Findex.sqlite", "..", "index.sqlite", "0" * 31 + "G"):
        response = client.get(f"/v2/acme/app/blobs/uploads/{upload}")
        assert 400 <= response.status_code < 500
        assert b"SQLite" not in response.content
