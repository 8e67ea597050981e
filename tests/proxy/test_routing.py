"""proxy.routing: where a request goes, from configuration alone (no client is made)."""

from __future__ import annotations

import pytest

from proxy import errors
from proxy.config import UpstreamConfig
from proxy.routing import Router

HUB = UpstreamConfig(name="docker.io", url="https://registry-1.docker.io", default=True)
GHCR = UpstreamConfig(name="ghcr.io", url="https://ghcr.io")
INTERNAL = UpstreamConfig(name="registry.example:5000", url="https://registry.example:5000", prefix="internal")
ROUTER = Router([HUB, GHCR, INTERNAL])


@pytest.mark.parametrize(
    ("name", "ns", "upstream", "repo", "prefix"),
    [
        ("alpine", None, HUB, "library/alpine", ""),
        ("acme/app", None, HUB, "acme/app", ""),
        ("library/alpine", "docker.io", HUB, "library/alpine", ""),
        ("alpine", "index.docker.io", HUB, "library/alpine", ""),
        ("acme/app", "ghcr.io", GHCR, "acme/app", ""),
        ("ghcr.io/acme/app", None, GHCR, "acme/app", "ghcr.io/"),
        ("internal/team/app", None, INTERNAL, "team/app", "internal/"),
    ],
)
def test_ns_then_prefix_then_the_default(
    name: str, ns: str | None, upstream: UpstreamConfig, repo: str, prefix: str
) -> None:
    route = ROUTER.route(name, ns)
    assert (route.upstream, route.repo, route.prefix) == (upstream, repo, prefix)


def test_unknown_registries_and_bad_names_are_refused() -> None:
    with pytest.raises(errors.NameUnknown):
        ROUTER.route("acme/app", "quay.io")
    with pytest.raises(errors.NameUnknown):
        ROUTER.route("quay.io/acme/app", None)
    with pytest.raises(errors.NameInvalid):
        ROUTER.route("Acme/App", None)
    with pytest.raises(errors.NameUnknown):
        Router([GHCR]).route("alpine", None)  # no default upstream


def test_catalog_names_are_written_as_clients_write_them() -> None:
    assert ROUTER.client_name("docker.io", "library/alpine") == "library/alpine"
    assert ROUTER.client_name("ghcr.io", "acme/app") == "ghcr.io/acme/app"
    assert ROUTER.client_name("registry.example:5000", "team/app") == "internal/team/app"
