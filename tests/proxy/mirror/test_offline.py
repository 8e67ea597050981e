"""`[cache] offline = true`: only the cache answers, and no upstream is ever contacted."""

from __future__ import annotations

import httpx

from tests.support.faulty import OCI_MANIFEST, FaultyRegistry
from tests.support.proxy import Proxy


def test_offline_serves_the_cache_without_revalidating_and_refuses_the_rest_clearly() -> None:
    with FaultyRegistry() as upstream:
        digest, blobs = upstream.add_image("acme/app", "1")
        upstream.add_image("acme/app", "2")
        accept = {"Accept": OCI_MANIFEST}
        with (
            Proxy({"cache": {"tag_ttl": "0s"}}, upstream_url=upstream.url) as proxy,
            httpx.Client(timeout=10) as client,
        ):
            base = f"{proxy.url}/v2/acme/app"
            assert client.get(f"{base}/manifests/1", headers=accept).status_code == 200
            for blob in blobs:
                assert client.get(f"{base}/blobs/{blob}").status_code == 200

            proxy.stop()
            proxy.config["cache"]["offline"] = True
            proxy.write_config()
            proxy.start()
            upstream.reset_log()

            tagged = client.get(f"{base}/manifests/1", headers=accept)
            assert tagged.status_code == 200 and tagged.headers["Docker-Content-Digest"] == digest
            assert client.get(f"{base}/manifests/{digest}", headers=accept).status_code == 200
            for blob in blobs:
                assert client.get(f"{base}/blobs/{blob}").content == upstream.blob(blob)
            assert client.get(f"{base}/tags/list").json()["tags"] == ["1"]

            uncached = (
                f"{base}/manifests/2",
                f"{base}/blobs/sha256:{'0' * 64}",
                f"{proxy.url}/v2/acme/other/tags/list",
            )
            for url in uncached:
                refused = client.get(url, headers=accept)
                assert refused.status_code == 503, url
                error = refused.json()["errors"][0]
                assert error["code"] == "UNAVAILABLE" and "offline mode" in error["message"], error
                assert "Retry-After" not in refused.headers
            assert upstream.total_connections() == 0
