"""No cross-repository leaks: content cached through one repository is served by digest
under another only if that one is known to hold it, or its upstream says so."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support.auth import error_code, user_entry
from tests.support.faulty import OCI_MANIFEST, FaultyRegistry
from tests.support.images import PushedImage
from tests.support.proxy import Proxy
from tests.support.registry import Registry

ALICE = ("alice", "alice-pw")


def test_blob_and_manifest_cached_through_a_private_repository_stay_there(
    upstream: Registry, proxy_factory: Callable[..., Proxy]
) -> None:
    """Distribution scopes blobs to repositories, as Docker Hub does: the HEAD upstream says no."""
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    secret, public = images["docker"], images["alpine"]
    proxy = proxy_factory(
        {
            "auth": {"user": [user_entry(ALICE)], "default": "anyone"},
            "access": [{"repository": f"docker.io/{secret.repo}", "pull": ["alice"]}],
        },
        upstream_url=upstream.url,
    )
    layer = secret.blobs[-1].digest
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        client.get(f"/v2/{secret.repo}/manifests/{secret.tag}", auth=ALICE).raise_for_status()
        assert client.get(f"/v2/{secret.repo}/blobs/{layer}", auth=ALICE).status_code == 200
        assert client.get(f"/v2/{secret.repo}/blobs/{layer}").status_code == 401
        elsewhere = f"/v2/{public.repo}"
        for response, code in [
            (client.get(f"{elsewhere}/blobs/{layer}"), "BLOB_UNKNOWN"),
            (client.get(f"{elsewhere}/manifests/{secret.digest}"), "MANIFEST_UNKNOWN"),
            (client.get(f"/v2/docker.io{elsewhere}/blobs/{layer}"), "BLOB_UNKNOWN"),
        ]:
            assert response.status_code == 404
            assert error_code(response) == code
        assert client.head(f"{elsewhere}/blobs/{layer}").status_code == 404
        assert client.head(f"{elsewhere}/manifests/{secret.digest}").status_code == 404
        for blob in public.blobs:  # the public repository's own content flows as before
            assert client.get(f"{elsewhere}/blobs/{blob.digest}").status_code == 200
        upstream.stop()
        try:  # with nobody to ask, an unknown link is a refusal, never the cached bytes
            assert client.get(f"{elsewhere}/blobs/{layer}").status_code == 503
            assert client.get(f"{elsewhere}/manifests/{secret.digest}").status_code == 503
            assert client.get(f"{elsewhere}/blobs/{public.blobs[0].digest}").status_code == 200
        finally:
            upstream.start()


def test_other_repositories_get_cached_content_once_their_upstream_confirms_it() -> None:
    with FaultyRegistry() as registry:  # its blobs exist under every repository name
        manifest, (config, layer) = registry.add_image("team/a", "1")
        with Proxy(upstream_url=registry.url) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
            client.get("/v2/team/a/manifests/1").raise_for_status()
            assert client.get(f"/v2/team/a/blobs/{layer}").content == registry.blob(layer)
            registry.reset_log()
            for _ in range(3):
                assert client.get(f"/v2/team/b/blobs/{layer}").content == registry.blob(layer)
            assert client.head(f"/v2/team/c/blobs/{config}").status_code == 200
            assert [(r.method, r.path) for r in registry.requests()] == [
                ("HEAD", f"/v2/team/b/blobs/{layer}"),  # asked once, then remembered
                ("HEAD", f"/v2/team/c/blobs/{config}"),
            ]
            assert registry.gets(layer) == 0  # served from the cache all the same
            # Manifests are per repository even here.
            assert client.get(f"/v2/team/d/manifests/{manifest}").status_code == 404
            registry.add_manifest("team/d", None, client.get(f"/v2/team/a/manifests/{manifest}").content, OCI_MANIFEST)
            assert client.get(f"/v2/team/d/manifests/{manifest}").status_code == 200


def test_offline_pulls_of_images_pulled_before_still_work_after_a_restart() -> None:
    with FaultyRegistry() as registry:
        amd64, amd64_blobs = registry.add_image("team/multi", None, layer_sizes=[100])
        arm64, arm64_blobs = registry.add_image("team/multi", None, layer_sizes=[200])
        index = registry.add_index("team/multi", "1", [amd64, arm64])
        blobs = amd64_blobs + arm64_blobs
        with Proxy(upstream_url=registry.url) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
            client.get("/v2/team/multi/manifests/1").raise_for_status()
            for digest in (index, amd64, arm64):  # the same image in a second repository
                stored = client.get(f"/v2/team/multi/manifests/{digest}")
                tag = "1" if digest == index else None
                registry.add_manifest("team/copy", tag, stored.content, stored.headers["Content-Type"])
            for digest in blobs:
                client.get(f"/v2/team/multi/blobs/{digest}").raise_for_status()
            # Through the second repository only its tag: children and blobs are cached already,
            # and what the index references is linked to that repository from now on.
            client.get("/v2/team/copy/manifests/1").raise_for_status()
            registry.stop()
            proxy.stop()
            proxy.start()
            for repo in ("team/multi", "team/copy"):  # in the order clients ask
                assert client.get(f"/v2/{repo}/manifests/1").status_code == 200
                for kind, digest in [("manifests", amd64), ("manifests", arm64), *(("blobs", d) for d in blobs)]:
                    assert client.get(f"/v2/{repo}/{kind}/{digest}").status_code == 200, (repo, kind, digest)
                    assert client.head(f"/v2/{repo}/{kind}/{digest}").status_code == 200, (repo, kind, digest)
            assert client.get(f"/v2/team/other/blobs/{blobs[0]}").status_code == 503
            assert client.get(f"/v2/team/other/manifests/{amd64}").status_code == 503
