"""`--workers 2` on one hosted index: concurrent pushes through both processes all land, gc among them."""

from __future__ import annotations

import json
import threading

import httpx

from tests.proxy.hosted.test_push_api import EMPTY_CONFIG, image_manifest, sha
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


def test_concurrent_pushes_through_two_workers_all_land() -> None:
    config = {"hosted": {"repositories": ["acme/**"]}}
    answers: list[int] = []
    with FaultyRegistry() as upstream, Proxy(config, upstream_url=upstream.url, args=["--workers", "2"]) as proxy:

        def push(index: int) -> None:
            layer = f"layer {index}".encode() * 1000
            with httpx.Client(base_url=proxy.url, timeout=60) as client:
                for blob in (EMPTY_CONFIG, layer):
                    answers.append(
                        client.post(
                            "/v2/acme/app/blobs/uploads/", params={"digest": sha(blob)}, content=blob
                        ).status_code
                    )
                body = image_manifest(layer)
                headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
                answers.append(
                    client.put(f"/v2/acme/app/manifests/t{index}", content=body, headers=headers).status_code
                )

        threads = [threading.Thread(target=push, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        tags = httpx.get(f"{proxy.url}/v2/acme/app/tags/list", timeout=30).json()["tags"]
        lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    assert answers == [201] * 36
    assert sorted(tags) == sorted(f"t{i}" for i in range(12))
    assert len({line["pid"] for line in lines if line.get("method") == "PUT"}) == 2, "both workers should have pushed"
