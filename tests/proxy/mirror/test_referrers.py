"""The OCI 1.1 referrers API: signatures and SBOMs reach clients, offline ones too."""

from __future__ import annotations

import json

import httpx

from tests.support.faulty import OCI_INDEX, OCI_MANIFEST, FaultyRegistry
from tests.support.proxy import Proxy

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def add_referrers_tag(upstream: FaultyRegistry, repo: str, subject: str) -> list[dict[str, object]]:
    """What cosign/oras push to a registry without the referrers API: an index under `sha256-<hex>`."""
    descriptors = []
    for artifact_type in (SIGNATURE, SBOM):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type}).encode()
        digest = upstream.add_manifest(repo, None, body, OCI_MANIFEST)
        descriptors.append(
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": artifact_type}
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).encode()
    upstream.add_manifest(repo, subject.replace(":", "-"), index, OCI_INDEX)
    return descriptors


def test_referrers_fall_back_to_the_tag_schema_filter_and_survive_the_upstream_going_away() -> None:
    with FaultyRegistry() as upstream:
        subject, _ = upstream.add_image("acme/signed", "1")
        descriptors = add_referrers_tag(upstream, "acme/signed", subject)
        with Proxy({"cache": {"tag_ttl": "0s"}}, upstream_url=upstream.url) as proxy, httpx.Client() as client:
            url = f"{proxy.url}/v2/acme/signed/referrers/{subject}"
            everything = client.get(url, timeout=10)
            assert everything.status_code == 200
            assert everything.headers["Content-Type"] == OCI_INDEX
            assert everything.json()["manifests"] == descriptors
            only_sboms = client.get(url, params={"artifactType": SBOM}, timeout=10)
            assert only_sboms.json()["manifests"] == [descriptors[1]]
            assert only_sboms.headers["OCI-Filters-Applied"] == "artifactType"
            upstream.stop()
            offline = client.get(url, params={"artifactType": SIGNATURE}, timeout=10)
            assert offline.status_code == 200
            assert offline.json()["manifests"] == [descriptors[0]]


def test_no_referrers_is_an_empty_index_and_a_bad_digest_is_refused() -> None:
    with FaultyRegistry() as upstream:
        subject, _ = upstream.add_image("acme/plain", "1")
        with Proxy(upstream_url=upstream.url) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
            empty = client.get(f"/v2/acme/plain/referrers/{subject}")
            assert empty.status_code == 200
            assert empty.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            bad = client.get("/v2/acme/plain/referrers/sha256:nothex")
            assert bad.status_code == 400
            assert bad.json()["errors"][0]["code"] == "DIGEST_INVALID"
