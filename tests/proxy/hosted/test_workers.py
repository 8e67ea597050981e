"""`--workers 2` on one hosted index: concurrent pushes through both processes all land, gc among them."""

from __future__ import annotations

import json
import threading

import httpx

from tests.proxy.hosted.test_push_api import EMPTY_CONFIG, image_manifest, sha
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


def test_concurrent_pushes_through_two_workers_all_land() -> None:
    # Which worker accepts a connection is the kernel's choice: rounds of pushes, until both
    # workers have taken some of a round's manifest PUTs.
    config = {"hosted": {"repositories": ["acme/**"]}}
    with FaultyRegistry() as upstream, Proxy(config, upstream_url=upstream.url, args=["--workers", "2"]) as proxy:
        pushed: list[str] = []
        for round_number in range(5):
            answers: list[int] = []

            def push(tag: str, answers: list[int] = answers) -> None:
                layer = f"layer {tag}".encode() * 1000
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
                        client.put(f"/v2/acme/app/manifests/{tag}", content=body, headers=headers).status_code
                    )

            tags = [f"r{round_number}t{i}" for i in range(12)]
            threads = [threading.Thread(target=push, args=(tag,)) for tag in tags]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert answers == [201] * 36
            pushed += tags
            listed = httpx.get(f"{proxy.url}/v2/acme/app/tags/list", timeout=30).json()["tags"]
            assert sorted(listed) == sorted(pushed)
            lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
            puts = [line for line in lines if line.get("method") == "PUT" and line["path"].split("/")[-1] in tags]
            if len({line["pid"] for line in puts}) == 2:
                return
    raise AssertionError("no round of pushes reached both workers")
