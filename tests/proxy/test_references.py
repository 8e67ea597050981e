"""Image references on the command line and in `[[pin]]`s resolve like requests do."""

from __future__ import annotations

import pytest

from proxy import errors, references, routing
from proxy.config import UpstreamConfig
from proxy.routing import Router

DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def router() -> Router:
    return Router(
        [
            UpstreamConfig(name="docker.io", url="http://hub", default=True),
            UpstreamConfig(name="ghcr.io", url="http://ghcr"),
            UpstreamConfig(name="registry.example:5000", url="http://internal", prefix="internal"),
        ]
    )


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("docker.io/alpine:3.19", "docker.io/library/alpine:3.19"),
        ("index.docker.io/acme/app", "docker.io/acme/app:latest"),
        ("acme/app:1.2", "docker.io/acme/app:1.2"),
        ("ghcr.io/acme/app:1.2", "ghcr.io/acme/app:1.2"),
        (f"registry.example:5000/team/app@{DIGEST}", f"registry.example:5000/team/app@{DIGEST}"),
        (f"ghcr.io/acme/app:1.2@{DIGEST}", "ghcr.io/acme/app:1.2"),
    ],
)
def test_references_resolve_to_an_upstream_and_repository(router: Router, text: str, canonical: str) -> None:
    ref = references.parse(text)
    assert routing.canonical(router.resolve(ref), ref) == canonical
    assert ref.reference == (DIGEST if "@" in text else ref.tag or "latest")


@pytest.mark.parametrize("text", ["Alpine", "acme/app:", "acme//app", "acme/app@sha256:123", "acme/app:bad!tag"])
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        references.parse(text)


def test_an_unconfigured_registry_is_refused(router: Router) -> None:
    with pytest.raises(errors.RegistryError, match=r"quay\.io"):
        router.resolve(references.parse("quay.io/acme/app"))
