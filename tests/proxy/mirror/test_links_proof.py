"""A repository holds what its manifests carry, nothing they merely name.

A public repository's manifest can name any digest in its `subject` (or in fields its
kind does not have), and a referrers answer can list any digest: none of that may let a
blob cached through a private repository be served under the public name without the
upstream confirming it. Distribution scopes blobs to repositories, so its answer to that
check is 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cache.manifests import referenced_digests
from cache.mediatypes import DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, OCI_ARTIFACT, OCI_INDEX
from tests.support.auth import error_code, user_entry
from tests.support.images import OCI_MANIFEST, PushedImage, Pusher, canonical_json, push_oci_image
from tests.support.inprocess import MemoryRegistry, mirror_client
from tests.support.proxy import Proxy
from tests.support.registry import Registry

ALICE = ("alice", "alice-pw")
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"


@pytest.fixture
def private_and_public(
    registry_factory: Callable[..., Registry], proxy_factory: Callable[..., Proxy]
) -> Iterator[tuple[Registry, Proxy, PushedImage, PushedImage]]:
    """`secret/app` for alice only, `public/app` for anyone; the secret layer cached by alice's pull."""
    registry = registry_factory()
    secret = push_oci_image(registry.url, "secret/app", "1")
    public = push_oci_image(registry.url, "public/app", "1")
    proxy = proxy_factory(
        {
            "auth": {"user": [user_entry(ALICE)], "default": "anyone"},
            "access": [{"repository": "docker.io/secret/*", "pull": ["alice"]}],
        },
        upstream_url=registry.url,
    )
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        client.get("/v2/secret/app/manifests/1", auth=ALICE).raise_for_status()
        assert client.get(f"/v2/secret/app/blobs/{secret.blobs[-1].digest}", auth=ALICE).status_code == 200
    yield registry, proxy, secret, public


def assert_not_served(client: httpx.Client, repo: str, digest: str) -> None:
    """Asked through `repo`, the upstream says it has no such blob there: 404, never the cached bytes."""
    response = client.get(f"/v2/{repo}/blobs/{digest}")
    assert response.status_code == 404, response.content[:100]
    assert error_code(response) == "BLOB_UNKNOWN"
    assert client.head(f"/v2/{repo}/blobs/{digest}").status_code == 404


def test_a_public_manifest_naming_a_private_layer_in_its_subject_does_not_open_the_layer(
    private_and_public: tuple[Registry, Proxy, PushedImage, PushedImage],
) -> None:
    registry, proxy, secret, public = private_and_public
    layer = secret.blobs[-1]
    naming = json.loads(public.manifest)
    naming["subject"] = layer.descriptor()
    with Pusher(registry.url) as pusher:
        pusher.push_manifest("public/app", "signed", canonical_json(naming), OCI_MANIFEST)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.get("/v2/secret/app/blobs/" + layer.digest).status_code == 401  # anonymous
        assert client.get("/v2/public/app/manifests/signed").status_code == 200
        assert_not_served(client, "public/app", layer.digest)
        for blob in public.blobs:  # what the manifest does carry is served as before
            assert client.get(f"/v2/public/app/blobs/{blob.digest}").status_code == 200


def test_a_public_manifest_naming_a_private_layer_in_fields_of_other_kinds_does_not_open_it(
    private_and_public: tuple[Registry, Proxy, PushedImage, PushedImage],
) -> None:
    """Distribution checks an image's config and layers only; `blobs` and `fsLayers` it stores unread."""
    registry, proxy, secret, public = private_and_public
    layer = secret.blobs[-1]
    naming = json.loads(public.manifest)
    naming["blobs"] = [layer.descriptor()]
    naming["fsLayers"] = [{"blobSum": layer.digest}]
    with Pusher(registry.url) as pusher:
        pusher.push_manifest("public/app", "other-fields", canonical_json(naming), OCI_MANIFEST)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.get("/v2/public/app/manifests/other-fields").status_code == 200
        assert_not_served(client, "public/app", layer.digest)


def test_a_public_referrers_tag_naming_a_private_layer_does_not_open_the_layer(
    private_and_public: tuple[Registry, Proxy, PushedImage, PushedImage],
) -> None:
    """The referrers-tag fallback (distribution 2.8 has no referrers API): an index under
    `sha256-<hex>` listing a signature whose subject is the layer, and naming it itself."""
    registry, proxy, secret, public = private_and_public
    layer = secret.blobs[-1]
    signature = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE,
        "config": public.blobs[0].descriptor(),
        "layers": [public.blobs[-1].descriptor()],
        "subject": layer.descriptor(),
    }
    body = canonical_json(signature)
    with Pusher(registry.url) as pusher:
        signature_digest = pusher.push_manifest("public/app", "signature", body, OCI_MANIFEST)
        descriptor = {"mediaType": OCI_MANIFEST, "digest": signature_digest, "size": len(body)}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{**descriptor, "artifactType": SIGNATURE}]}
        index["subject"] = layer.descriptor()
        pusher.push_manifest("public/app", layer.digest.replace(":", "-"), canonical_json(index), OCI_INDEX)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        referrers = client.get(f"/v2/public/app/referrers/{layer.digest}")
        assert referrers.status_code == 200
        assert [m["digest"] for m in referrers.json()["manifests"]] == [signature_digest]
        assert client.get(f"/v2/public/app/manifests/{signature_digest}").status_code == 200  # as cosign does
        assert_not_served(client, "public/app", layer.digest)


def test_what_a_referrers_answer_lists_is_not_linked_to_the_repository(tmp_path: Path) -> None:
    """The referrers API (here an in-process upstream offering it) answers with any digests it likes."""
    upstream = MemoryRegistry()
    _, _, layer = upstream.add_image("secret/app", "1", b"the private layer")
    upstream.add_image("public/app", "1", b"a public layer")
    listing = {"mediaType": OCI_MANIFEST, "digest": layer, "size": 17, "artifactType": SIGNATURE}
    upstream.referrers[("public/app", layer)] = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [listing]}
    ).encode()
    with mirror_client(tmp_path, upstream) as client:
        assert client.get(f"/v2/secret/app/blobs/{layer}").content == b"the private layer"
        referrers = client.get(f"/v2/public/app/referrers/{layer}")
        assert referrers.json()["manifests"] == [listing]
        upstream.requests.clear()
        assert client.get(f"/v2/public/app/blobs/{layer}").status_code == 404
        assert ("HEAD", f"/v2/public/app/blobs/{layer}") in upstream.asked()


LAYER, CONFIG, CHILD, OTHER = (f"sha256:{c * 64}" for c in "abcd")


def _descriptor(digest: str) -> dict[str, object]:
    return {"mediaType": "application/octet-stream", "digest": digest, "size": 1}


@pytest.mark.parametrize(
    ("media_type", "manifest", "carried"),
    [
        (OCI_MANIFEST, {"config": _descriptor(CONFIG), "layers": [_descriptor(LAYER)]}, [CONFIG, LAYER]),
        (DOCKER_MANIFEST, {"mediaType": DOCKER_MANIFEST, "config": _descriptor(CONFIG), "layers": []}, [CONFIG]),
        (OCI_INDEX, {"manifests": [_descriptor(CHILD)], "layers": [_descriptor(LAYER)]}, [CHILD]),
        (DOCKER_LIST, {"mediaType": DOCKER_LIST, "manifests": [_descriptor(CHILD)]}, [CHILD]),
        (OCI_ARTIFACT, {"blobs": [_descriptor(LAYER)], "layers": [_descriptor(OTHER)]}, [LAYER]),
        (DOCKER_SCHEMA1_SIGNED, {"schemaVersion": 1, "fsLayers": [{"blobSum": LAYER}]}, [LAYER]),
        (OCI_MANIFEST, {"mediaType": OCI_INDEX, "manifests": [_descriptor(CHILD)]}, []),  # body of another kind
        ("application/vnd.example+json", {"layers": [_descriptor(LAYER)]}, []),  # an unknown kind carries nothing
    ],
)
def test_a_manifest_carries_the_fields_of_its_kind_and_never_its_subject(
    media_type: str, manifest: dict[str, object], carried: list[str]
) -> None:
    body = json.dumps({**manifest, "subject": _descriptor(OTHER)}).encode()
    assert referenced_digests(body, media_type) == carried
