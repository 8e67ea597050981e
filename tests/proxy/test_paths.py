"""proxy.paths.classify: the one classifier of Distribution API paths, in-process."""

from __future__ import annotations

import pytest

from proxy.paths import Endpoint, classify

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/acme/app/manifests/1.2", (Endpoint.MANIFEST, "acme/app", "1.2")),
        (f"/v2/library/alpine/manifests/{DIGEST}", (Endpoint.MANIFEST, "library/alpine", DIGEST)),
        (f"/v2/a/b/c/blobs/{DIGEST}", (Endpoint.BLOB, "a/b/c", DIGEST)),
        ("/v2/acme/app/tags/list", (Endpoint.TAGS, "acme/app", "list")),
        (f"/v2/acme/app/referrers/{DIGEST}", (Endpoint.REFERRERS, "acme/app", DIGEST)),
        ("/v2/", (Endpoint.BASE, "", "")),
        ("/v2/_catalog", (Endpoint.CATALOG, "", "")),
        ("/token", (Endpoint.TOKEN, "", "")),
        ("/auth/token", (Endpoint.TOKEN, "", "")),
        ("/", (Endpoint.OTHER, "", "")),
        ("/metrics", (Endpoint.OTHER, "", "")),
        ("/v2/acme/app/uploads/1", (Endpoint.OTHER, "", "")),
        ("/v2/acme/app/blobs/uploads/", (Endpoint.UPLOAD, "acme/app", "")),
        ("/v2/acme/app/blobs/uploads/" + "0" * 32, (Endpoint.UPLOAD, "acme/app", "0" * 32)),
        ("/v2/blobs/uploads/x", (Endpoint.OTHER, "", "")),  # no repository before the segment
        ("/v2/manifests/1", (Endpoint.OTHER, "", "")),  # no repository before the segment
    ],
)
def test_a_path_names_its_endpoint_repository_and_reference(path: str, expected: tuple[Endpoint, str, str]) -> None:
    assert classify(path) == expected


def test_a_repository_named_like_a_segment_is_taken_apart_from_the_right() -> None:
    assert classify("/v2/team/manifests/blobs/sha256:1") == (Endpoint.BLOB, "team/manifests", "sha256:1")
    assert classify("/v2/blobs/tags/list") == (Endpoint.TAGS, "blobs", "list")


def test_endpoints_are_the_route_labels_of_the_request_metrics() -> None:
    labels = {"manifest", "blob", "upload", "tags", "referrers", "catalog", "base", "token", "other"}
    assert {str(endpoint) for endpoint in Endpoint} == labels
    classified = classify("/v2/acme/app/manifests/1")
    assert classified.endpoint is Endpoint.MANIFEST and str(classified.endpoint) == "manifest"
