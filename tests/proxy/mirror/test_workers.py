"""`--workers N`: processes sharing one cache directory still fetch each blob once."""

from __future__ import annotations

import json
import threading

import httpx

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


def test_workers_share_one_download_per_blob() -> None:
    with FaultyRegistry() as upstream:
        _, (_, layer) = upstream.add_image("acme/app", "1", layer_sizes=[3 << 20])
        upstream.slow(digest=layer, chunk_size=128 << 10, chunk_delay=0.05)
        bodies: list[bytes] = []
        with Proxy(upstream_url=upstream.url, args=["--workers", "2"]) as proxy:

            def pull() -> None:
                # A fresh connection each, so the kernel spreads them over both workers.
                bodies.append(httpx.get(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=60).content)

            threads = [threading.Thread(target=pull) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
        served_by = {line["pid"] for line in lines if line.get("event") == "request" and line["path"].endswith(layer)}
        assert len(bodies) == 16
        assert all(body == upstream.blob(layer) for body in bodies)
        assert upstream.gets(layer) == 1
        assert len(served_by) == 2, "both workers should have served the blob"


def test_workers_abort_every_reader_when_the_upstream_breaks_off() -> None:
    with FaultyRegistry() as upstream:
        _, (_, layer) = upstream.add_image("acme/app", "1", layer_sizes=[3 << 20])
        upstream.slow(digest=layer, chunk_size=128 << 10, chunk_delay=0.05)
        upstream.truncate(layer, times=1)
        outcomes: list[str] = []
        with Proxy(upstream_url=upstream.url, args=["--workers", "2"]) as proxy:

            def pull() -> None:
                try:
                    httpx.get(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=60).raise_for_status()
                    outcomes.append("complete")
                except httpx.HTTPError:
                    outcomes.append("aborted")

            threads = [threading.Thread(target=pull) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert outcomes == ["aborted"] * 8
            assert list((proxy.cache_dir / "content").rglob("*.val")) == []
            assert httpx.get(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=60).content == upstream.blob(layer)
