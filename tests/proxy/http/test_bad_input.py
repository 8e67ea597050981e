"""Bad input gets an OCI error with a 4xx, never a 500: each case that once did, then
arbitrary names, references, digests, query strings and Range headers at every route."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache import digests
from proxy import errors, references
from proxy.config import ConfigError, load
from proxy.routing import Router, valid_name
from tests.support.faulty import FaultyRegistry
from tests.support.inprocess import MemoryRegistry, mirror_client
from tests.support.proxy import Proxy

HUGE = "9" * 5000  # int() refuses more than 4300 digits


@pytest.fixture(scope="module")
def upstream() -> MemoryRegistry:
    registry = MemoryRegistry()
    manifest, _, layer = registry.add_image("team/app", "1", b"x" * 1000)
    registry.referrers[("team/app", manifest)] = b"[1, 2]"  # not an index: the upstream's mistake
    registry.referrers[("team/app", layer)] = json.dumps({"schemaVersion": 2, "manifests": "no"}).encode()
    registry.head_blob_length = False
    return registry


@pytest.fixture(scope="module")
def client(upstream: MemoryRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with mirror_client(tmp_path_factory.mktemp("mirror"), upstream) as mirror:
        yield mirror


def digest_of(upstream: MemoryRegistry, kind: str) -> str:
    """The manifest's (`kind` "manifest"), config's or layer's digest of team/app:1."""
    body, _ = upstream.manifests[("team/app", "1")]
    manifest = json.loads(body)
    if kind == "manifest":
        return next(ref for (repo, ref), found in upstream.manifests.items() if ":" in ref and found[0] == body)
    return str(manifest["config"]["digest"] if kind == "config" else manifest["layers"][0]["digest"])


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.json()["errors"][0]["code"] == code


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/team/app/manifests/1%0a", 404, "MANIFEST_UNKNOWN"),
        ("/v2/team/app/manifests/{manifest}%0a", 400, "DIGEST_INVALID"),
        ("/v2/team/app/blobs/{layer}%0a", 400, "DIGEST_INVALID"),
        ("/v2/team/app/referrers/{manifest}%0a", 400, "DIGEST_INVALID"),
        ("/v2/team/app/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/team/app/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
    ],
)
def test_a_trailing_newline_or_a_number_that_is_not_ascii_digits_is_refused(
    client: httpx.Client, upstream: MemoryRegistry, path: str, status: int, code: str
) -> None:
    path = path.format(manifest=digest_of(upstream, "manifest"), layer=digest_of(upstream, "layer"))
    assert_refused(client.get(path), status, code)


def test_a_trailing_newline_matches_no_pattern() -> None:
    """Starlette's path pattern keeps a newline out of `name`; the router must too, on its own."""
    assert valid_name("team/app") and not valid_name("team/app\n")
    with pytest.raises(errors.RegistryError) as refused:
        Router([]).route("team/app\n", None)
    assert refused.value.code == "NAME_INVALID"
    with pytest.raises(digests.InvalidDigest):
        digests.parse("sha256:" + "a" * 64 + "\n")
    assert references.valid_platform("linux/amd64") and not references.valid_platform("linux/amd64\n")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nlisten = "0.0.0.0:²"\n', "server.listen"),
        ('[[upstream]]\nname = "x.io"\nurl = "http://x\\nEvil: 1"\n', "upstream[0].url"),
        ('[[upstream]]\nname = "x.io"\nurl = "http://x"\nprefix = "in\\n"\n', "upstream[0].prefix"),
        ('[[access]]\nrepository = "docker.io/x\\n"\npull = "anyone"\n', "access[0].repository"),
    ],
)
def test_a_config_value_with_a_wrong_end_is_refused_naming_its_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "pullproxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load(path, environ={})


def test_a_huge_page_size_is_served_as_the_largest_page(client: httpx.Client, upstream: MemoryRegistry) -> None:
    """n above 10000 is clamped to 10000 (a registry may send fewer than asked), not refused."""
    upstream.requests.clear()
    tags = client.get(f"/v2/team/app/tags/list?n={HUGE}")
    assert tags.status_code == 200
    assert tags.json()["tags"] == ["1"]
    assert [r.url.params.get("n") for r in upstream.requests] == ["10000"]
    assert client.get(f"/v2/_catalog?n={HUGE}").status_code == 200
    assert client.get("/v2/team/app/tags/list?n=0007").json()["tags"] == ["1"]


@pytest.mark.parametrize(
    ("header", "status", "content_range"),
    [
        (f"bytes={HUGE}-", 416, "bytes */1000"),
        (f"bytes=0-{HUGE}", 206, "bytes 0-999/1000"),
        (f"bytes=-{HUGE}", 206, "bytes 0-999/1000"),
        (f"bytes={'0' * 5000}1-1", 206, "bytes 1-1/1000"),
        ("bytes=²-", 200, None),  # not a range this server reads: the whole blob is a valid answer
    ],
)
def test_range_numbers_of_any_length_are_read_without_failing(
    client: httpx.Client, upstream: MemoryRegistry, header: str, status: int, content_range: str | None
) -> None:
    layer = digest_of(upstream, "layer")
    response = client.get(f"/v2/team/app/blobs/{layer}", headers={b"Range": header.encode()})
    assert response.status_code == status, response.text[:300]
    assert response.headers.get("Content-Range") == content_range


@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("subject", ["manifest", "layer"])
def test_a_referrers_answer_that_is_not_an_index_is_the_upstreams_fault(
    client: httpx.Client, upstream: MemoryRegistry, subject: str, filtered: bool
) -> None:
    query = "?artifactType=application/example" if filtered else ""
    response = client.get(f"/v2/team/app/referrers/{digest_of(upstream, subject)}{query}")
    assert_refused(response, 502, "UNKNOWN")


def test_head_of_a_blob_of_unknown_size_has_no_content_length(client: httpx.Client, upstream: MemoryRegistry) -> None:
    response = client.head(f"/v2/team/app/blobs/{digest_of(upstream, 'config')}")  # not cached: asks upstream
    assert response.status_code == 200
    assert "content-length" not in response.headers


def test_head_of_a_blob_of_unknown_size_has_no_content_length_over_http() -> None:
    with FaultyRegistry() as registry:
        _, (config, _) = registry.add_image("team/app", "1")
        registry.fail(200, method="HEAD", path="/blobs/", body=b"", omit=["Content-Length"])
        with Proxy(upstream_url=registry.url) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
            response = client.head(f"/v2/team/app/blobs/{config}")
    assert response.status_code == 200
    assert "content-length" not in response.headers
    assert response.headers["docker-content-digest"] == config


# -- every route, arbitrary input ---------------------------------------------------------
#
# Each request is a valid one with one part (the name, the reference, the query or the
# Range header) drawn from anything at all, so every handler gets past the checks before it.

FUZZ_LAYER = b"y" * 3000
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60)
_WRONG_END = st.sampled_from(["\n", " ", "\x00", "²", "%", "/", ":", "Ä", "\u2028"])
_NUMBER = st.one_of(
    st.integers(0, 10**6).map(str),
    st.integers(-5, 10**40).map(str),
    st.integers(19, 6000).map(lambda k: "9" * k),  # int() refuses more than 4300 digits
    st.integers(1, 6000).map(lambda k: "0" * k + "1"),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6),  # "²", "٣": not ASCII digits
    st.builds(str.__add__, st.integers(0, 99).map(str), _WRONG_END),
    _TEXT,
)
_PARTS = ["name", "reference", "query", "range"]
_KINDS = ["manifests", "blobs", "referrers", "tags", "catalog"] * 3 + ["base", "token", "write", "operating"]


def _anything(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with a wrong end (a newline, a space, a NUL, a superscript), or any text."""
    return st.one_of(
        st.builds(str.__add__, valid, _WRONG_END), _TEXT, st.from_regex(r"[a-z0-9._/:-]{1,70}", fullmatch=True)
    )


@pytest.fixture(scope="module")
def fuzz_upstream() -> MemoryRegistry:
    """A healthy upstream: whatever the mirror answers with a 5xx is the mirror's fault."""
    registry = MemoryRegistry()
    manifest, _, layer = registry.add_image("team/app", "1", FUZZ_LAYER)
    sbom = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": layer, "size": 1, "artifactType": "s"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [sbom]}
    registry.referrers[("team/app", manifest)] = json.dumps(index).encode()
    return registry


@pytest.fixture(scope="module")
def fuzz_client(fuzz_upstream: MemoryRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with mirror_client(tmp_path_factory.mktemp("fuzz"), fuzz_upstream) as c:
        for _, digest in fuzz_upstream.blobs:
            c.get(f"/v2/team/app/blobs/{digest}").raise_for_status()  # cached, so Range applies
        yield c


@st.composite
def _requests(draw: st.DrawFn, upstream: MemoryRegistry) -> tuple[str, str, dict[bytes, bytes]]:
    """(method, path with query, headers) for any route, valid but for one part."""
    kind, wrong = draw(st.sampled_from(_KINDS)), draw(st.sampled_from(_PARTS))
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "DELETE"]))
    manifests = sorted({ref for repo, ref in upstream.manifests})
    blobs = sorted({digest for _, digest in upstream.blobs})
    names = st.sampled_from(["team/app", "registry.test/team/app", "team/other"])
    valid = {"manifests": manifests, "blobs": blobs, "referrers": [m for m in manifests if ":" in m]}.get(kind, ["1"])
    references = st.sampled_from([*valid, "sha256:" + "a" * 64, "sha512:" + "b" * 128])
    name = quote(draw(_anything(names) if wrong == "name" else names), safe="/")
    reference = quote(draw(_anything(references) if wrong == "reference" else references), safe=":")
    path = {
        "manifests": f"/v2/{name}/manifests/{reference}",
        "blobs": f"/v2/{name}/blobs/{reference}",
        "referrers": f"/v2/{name}/referrers/{reference}",
        "tags": f"/v2/{name}/tags/list",
        "catalog": "/v2/_catalog",
        "base": "/v2/",
        "token": "/token",
        "write": f"/v2/{name}/blobs/uploads/",
        "operating": draw(st.sampled_from(["/", "/healthz", "/readyz", "/metrics"])),
    }[kind]
    keys = st.sampled_from(["n", "last", "ns", "artifactType", "service", "scope", "account", "x"])
    values = st.one_of(_NUMBER, _anything(names), st.builds("repository:{}:pull".format, _anything(names)), _TEXT)
    query = [("n", draw(_NUMBER)), *draw(st.lists(st.tuples(keys, values), max_size=3))] if wrong == "query" else []
    headers: dict[bytes, bytes] = {}
    if wrong == "range":
        first, last = draw(st.one_of(st.just(""), _NUMBER)), draw(st.one_of(st.just(""), _NUMBER))
        forms = [f"bytes={first}-{last}", f"bytes={first}-{last},0-1", f"bytes={first}", first]
        headers[b"Range"] = draw(st.sampled_from(forms)).encode()
    if draw(st.booleans()):
        credentials = ["Basic %%%", "Basic Og==", "Bearer x.y.z", "Digest a"]
        headers[b"Authorization"] = draw(st.sampled_from(credentials)).encode()
    return method, f"{path}?{urlencode(query)}" if query else path, headers


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_input_makes_any_route_fail_with_a_5xx(
    fuzz_client: httpx.Client, fuzz_upstream: MemoryRegistry, data: st.DataObject
) -> None:
    method, path, headers = data.draw(_requests(fuzz_upstream))
    request = fuzz_client.build_request(method, path, headers=headers)
    response = fuzz_client.send(request)
    assert response.status_code < 500, (request.url, request.headers, response.text[:500])
    if response.status_code >= 400 and method != "HEAD":
        errors = response.json()["errors"]
        assert errors and all(isinstance(e["code"], str) and isinstance(e["message"], str) for e in errors)
