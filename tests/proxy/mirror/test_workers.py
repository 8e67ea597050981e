"""`--workers N`: processes sharing one cache directory still fetch each blob once."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


def test_workers_share_one_download_per_blob() -> None:
    # Which worker accepts a connection is the kernel's choice, so one round may land every
    # pull on one worker; a fresh blob per round, until a round has both serving it.
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url, args=["--workers", "2"]) as proxy:
        workers_serving: list[int] = []
        for round_number in range(5):
            _, (_, layer) = upstream.add_image(f"acme/app{round_number}", "1", layer_sizes=[3 << 20])
            upstream.slow(digest=layer, chunk_size=128 << 10, chunk_delay=0.05)
            bodies: list[bytes] = []

            def pull(url: str, bodies: list[bytes] = bodies) -> None:
                # A fresh connection each, so the kernel may spread them over both workers.
                bodies.append(httpx.get(url, timeout=60).content)

            url = f"{proxy.url}/v2/acme/app{round_number}/blobs/{layer}"
            threads = [threading.Thread(target=pull, args=(url,)) for _ in range(16)]
            for thread in threads:
                thread.start()
                time.sleep(0.02)  # spread over the download, while both workers wait in accept
            for thread in threads:
                thread.join(60)
            assert len(bodies) == 16
            assert all(body == upstream.blob(layer) for body in bodies)
            assert upstream.gets(layer) == 1
            lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
            requests = [line for line in lines if line.get("event") == "request"]
            served_by = {line["pid"] for line in requests if line["path"].endswith(layer)}
            workers_serving.append(len(served_by))
            if len(served_by) == 2:
                break
        assert 2 in workers_serving, f"no round had both workers serving the blob: {workers_serving}"


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
