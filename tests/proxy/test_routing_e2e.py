"""Routing requests to upstreams: `?ns=`, path prefixes, the default, and refusing the rest."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


@pytest.fixture(scope="module")
def hub() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def ghcr() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def internal() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@pytest.fixture(scope="module")
def proxy(hub: FaultyRegistry, ghcr: FaultyRegistry, internal: FaultyRegistry) -> Iterator[Proxy]:
    upstreams = [
        {"name": "docker.io", "url": hub.url, "default": True},
        {"name": "ghcr.io", "url": ghcr.url},
        {"name": "registry.example:5000", "url": internal.url, "prefix": "internal"},
    ]
    with Proxy({"upstream": upstreams}) as running:
        yield running


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        yield c


def digest_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["Docker-Content-Digest"]


def test_same_repository_name_on_three_upstreams_never_mixes(
    client: httpx.Client, hub: FaultyRegistry, ghcr: FaultyRegistry, internal: FaultyRegistry
) -> None:
    on_hub, _ = hub.add_image("acme/app", "1", layer_sizes=[11])
    on_ghcr, _ = ghcr.add_image("acme/app", "1", layer_sizes=[22])
    on_internal, _ = internal.add_image("acme/app", "1", layer_sizes=[33])
    assert len({on_hub, on_ghcr, on_internal}) == 3
    for _ in range(2):  # the second round is answered from the cache
        assert digest_of(client.get("/v2/acme/app/manifests/1")) == on_hub
        assert digest_of(client.get("/v2/acme/app/manifests/1", params={"ns": "docker.io"})) == on_hub
        assert digest_of(client.get("/v2/acme/app/manifests/1", params={"ns": "ghcr.io"})) == on_ghcr
        assert digest_of(client.get("/v2/ghcr.io/acme/app/manifests/1")) == on_ghcr
        ns = {"ns": "registry.example:5000"}
        assert digest_of(client.get("/v2/acme/app/manifests/1", params=ns)) == on_internal
        assert digest_of(client.get("/v2/internal/acme/app/manifests/1")) == on_internal


def test_docker_hub_aliases_and_library_prefix(client: httpx.Client, hub: FaultyRegistry) -> None:
    digest, _ = hub.add_image("library/alpine", "3.19")
    assert digest_of(client.get("/v2/alpine/manifests/3.19")) == digest
    assert digest_of(client.get("/v2/library/alpine/manifests/3.19")) == digest
    for ns in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert digest_of(client.get("/v2/alpine/manifests/3.19", params={"ns": ns})) == digest
    assert digest_of(client.get("/v2/docker.io/alpine/manifests/3.19")) == digest
    assert digest_of(client.get("/v2/docker.io/library/alpine/manifests/3.19")) == digest


def test_blobs_are_stored_once_across_upstreams(
    client: httpx.Client, proxy: Proxy, hub: FaultyRegistry, ghcr: FaultyRegistry
) -> None:
    shared = b"a layer that both registries hold" * 1000
    digest = hub.add_blob(shared)
    ghcr.add_blob(shared)
    assert client.get(f"/v2/acme/base/blobs/{digest}").content == shared
    assert client.get(f"/v2/ghcr.io/acme/base/blobs/{digest}").content == shared
    stored = [p for p in (proxy.cache_dir / "content").rglob("*.val") if p.stat().st_size == len(shared)]
    assert len(stored) == 1


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v2/acme/app/manifests/1", {"ns": "evil.example"}),
        ("/v2/acme/app/blobs/sha256:" + "0" * 64, {"ns": "127.0.0.1:9"}),
        ("/v2/evil.example/acme/app/manifests/1", {}),
        ("/v2/localhost/acme/app/manifests/1", {}),
        ("/v2/quay.io/acme/app/tags/list", {}),
    ],
)
def test_unknown_registry_is_refused_without_any_connection(
    client: httpx.Client,
    hub: FaultyRegistry,
    ghcr: FaultyRegistry,
    internal: FaultyRegistry,
    path: str,
    params: dict[str, str],
) -> None:
    before = [r.total_connections() for r in (hub, ghcr, internal)]
    response = client.get(path, params=params)
    assert response.status_code == 404
    body = response.json()["errors"][0]
    assert body["code"] == "NAME_UNKNOWN"
    assert "no upstream is configured" in body["message"]
    assert [r.total_connections() for r in (hub, ghcr, internal)] == before


def test_tags_link_keeps_the_prefix_and_ns(client: httpx.Client, ghcr: FaultyRegistry) -> None:
    for tag in ("a", "b", "c"):
        ghcr.add_image("acme/paged", tag, layer_sizes=[5])
    by_prefix = client.get("/v2/ghcr.io/acme/paged/tags/list", params={"n": "1"})
    assert by_prefix.json() == {"name": "ghcr.io/acme/paged", "tags": ["a"]}
    assert by_prefix.headers["Link"].startswith("</v2/ghcr.io/acme/paged/tags/list?n=1&last=a")
    by_ns = client.get("/v2/acme/paged/tags/list", params={"n": "1", "ns": "ghcr.io"})
    link = by_ns.headers["Link"]
    assert link.startswith("</v2/acme/paged/tags/list?") and "ns=ghcr.io" in link
    assert client.get(link[1 : link.index(">")]).json()["tags"] == ["b"]


def test_catalog_lists_cached_repositories_as_clients_name_them(
    client: httpx.Client, hub: FaultyRegistry, ghcr: FaultyRegistry
) -> None:
    hub.add_image("acme/listed", "1", layer_sizes=[3])
    ghcr.add_image("acme/listed", "1", layer_sizes=[4])
    client.get("/v2/acme/listed/manifests/1").raise_for_status()
    client.get("/v2/ghcr.io/acme/listed/manifests/1").raise_for_status()
    names = client.get("/v2/_catalog").json()["repositories"]
    assert "acme/listed" in names
    assert "ghcr.io/acme/listed" in names
    page = client.get("/v2/_catalog", params={"n": "1"})
    assert len(page.json()["repositories"]) == 1
    assert 'rel="next"' in page.headers["Link"]
