"""A fleet of three replicas on SeaweedFS and Redis behind haproxy, with real clients and real faults.

Every test builds its own fleet (`tests/support/fleet.py`): the object store, Redis, three
`pullproxy serve` processes sharing them, and haproxy spreading clients round-robin. The
upstream is the fault-injecting registry where a test needs a slowed download or to count GETs,
the seeded distribution registry where real clients pull real images.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.test_clients import assert_same_image
from tests.support.clients import Containerd, skopeo_copy
from tests.support.faulty import FaultyRegistry, pseudo_random_bytes
from tests.support.fleet import Fleet
from tests.support.images import PushedImage
from tests.support.registry import Registry

HERD = 48
HOSTED = {"hosted": {"repositories": ["acme/**"], "upload_ttl": "1h"}}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def faulty() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


@dataclass
class Outcome:
    """What one client got: the whole body, or an aborted transfer (and how far it came)."""

    status: int | None
    body: bytes
    aborted: bool
    error: str = ""


def get(url: str, timeout: float = 120.0) -> Outcome:
    """One GET on its own connection, read to the end; a cut transfer is an abort, not a short body."""
    received = bytearray()
    status: int | None = None
    try:
        with httpx.Client(timeout=timeout) as client, client.stream("GET", url) as response:
            status = response.status_code
            for chunk in response.iter_bytes():
                received += chunk
        return Outcome(status, bytes(received), aborted=False)
    except httpx.HTTPError as exc:
        return Outcome(status, bytes(received), aborted=True, error=f"{type(exc).__name__}: {exc}")


def herd(url: str, clients: int, *, on_start: Callable[[], None] | None = None) -> list[Outcome]:
    """``clients`` GETs of ``url`` released at once (a barrier), each on its own connection."""
    barrier = threading.Barrier(clients + 1)
    outcomes: list[Outcome | None] = [None] * clients

    def client(index: int) -> None:
        barrier.wait(30)
        outcomes[index] = get(url)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(30)
    if on_start is not None:
        on_start()
    for thread in threads:
        thread.join(180)
    assert all(o is not None for o in outcomes), "a client never finished"
    return [o for o in outcomes if o is not None]


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f}s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- real clients


def test_skopeo_and_containerd_pull_through_haproxy_over_three_replicas_byte_for_byte(
    upstream: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    with Fleet({"cache": {"tag_ttl": "0s"}}, upstream_url=upstream.url) as fleet:
        for kind, all_platforms in {"alpine": False, "multi": True, "docker": False, "big": False}.items():
            image = images[kind]
            folder = tmp_path / kind
            skopeo_copy(
                f"docker://{fleet.host}/{image.repo}:{image.tag}", f"dir:{folder}", all=all_platforms, timeout=300
            )
            assert_same_image(folder, image, all_platforms)
        alpine = images["alpine"]
        containerd.write_hosts_toml("docker.io", fleet.url)
        containerd.pull(f"docker.io/{alpine.repo}:{alpine.tag}", platform="linux/amd64")
        assert containerd.images()[f"docker.io/{alpine.repo}:{alpine.tag}"] == alpine.digest
        for blob in alpine.child().all_blobs() if alpine.is_index else alpine.all_blobs():
            assert sha256(containerd.content(blob.digest)) == blob.digest
        served = fleet.lb.served_by("/v2/")
        assert len(served) == 3, f"haproxy spread the pulls over every replica: {served}"


# --------------------------------------------------------------------------- single flight


def test_a_cold_herd_of_48_clients_over_three_replicas_makes_one_upstream_get(faulty: FaultyRegistry) -> None:
    data = pseudo_random_bytes("fleet-herd", 4 << 20)
    digest = faulty.add_blob(data)
    # About 3 s upstream: every client arrives while the one download runs.
    faulty.slow(method="GET", digest=digest, chunk_size=64 << 10, chunk_delay=0.05)
    with Fleet(upstream_url=faulty.url) as fleet:
        fleet.lb.reset_log()
        outcomes = herd(f"{fleet.url}/v2/library/herd/blobs/{digest}", HERD)
        bad = [(o.status, len(o.body), o.error) for o in outcomes if o.aborted or o.status != 200 or o.body != data]
        assert not bad, f"{len(bad)} clients did not get the blob: {bad[:5]}"
        assert faulty.gets(digest) == 1, f"{faulty.gets(digest)} upstream GETs for one blob over the fleet"
        served = fleet.lb.served_by(f"/blobs/{digest}")
        assert served == {"r0": HERD // 3, "r1": HERD // 3, "r2": HERD // 3}
        # Every replica sees the whole fleet by the URLs it advertises (the heartbeat registry).
        urls = sorted(proxy.url for proxy in fleet.replicas)
        for proxy in fleet.replicas:
            wait_for("listing the fleet", lambda p=proxy: _listed(p.url) == urls)
        # And now warm: every replica serves it from the fleet's cache, the upstream is not asked again.
        for proxy in fleet.replicas:
            assert get(f"{proxy.url}/v2/library/herd/blobs/{digest}").body == data
        assert faulty.gets(digest) == 1


def _readyz(url: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/readyz", timeout=10).json()
    return answer


def _listed(url: str) -> list[str]:
    """The replicas' URLs that replica ``url`` lists on /readyz."""
    return sorted(record["url"] for record in _readyz(url).get("coordination", {}).get("replicas", []))


def _lease_value(fleet: Fleet, digest: str) -> dict[str, str] | None:
    client = redis.Redis.from_url(fleet.redis_server.url, socket_timeout=2)
    try:
        value = client.get(f"pullproxy:lease:{digest}")
    finally:
        client.close()
    return None if value is None else json.loads(value)


def _lease_holder(fleet: Fleet, digest: str) -> int | None:
    """The replica whose URL the Redis lease of ``digest`` names, if one holds it."""
    client = redis.Redis.from_url(fleet.redis_server.url, socket_timeout=2)
    try:
        value = client.get(f"pullproxy:lease:{digest}")
    finally:
        client.close()
    if value is None:
        return None
    text = value.decode(errors="replace")
    holders = [i for i, proxy in enumerate(fleet.replicas) if proxy.url in text]
    return holders[0] if len(holders) == 1 else None


def test_the_owning_replica_killed_mid_download_aborts_transfers_and_another_takes_over(
    faulty: FaultyRegistry,
) -> None:
    data = pseudo_random_bytes("fleet-kill", 4 << 20)
    digest = faulty.add_blob(data)
    # About 13 s upstream, the first time only: the retries after the kill go at full speed.
    faulty.slow(method="GET", digest=digest, chunk_size=32 << 10, chunk_delay=0.1, times=1)
    with Fleet(upstream_url=faulty.url) as fleet:
        url = f"{fleet.url}/v2/library/kill/blobs/{digest}"
        owner: list[int] = []

        def kill_the_owner() -> None:
            wait_for("leased", lambda: _lease_holder(fleet, digest) is not None)
            wait_for("downloading", lambda: faulty.count("GET", digest) >= 1)
            time.sleep(1.0)  # bytes are flowing to every client
            holder = _lease_holder(fleet, digest)
            lease = _lease_value(fleet, digest)
            assert holder is not None and lease is not None
            # One identity per replica: the lease names the id its heartbeat and /readyz give.
            assert _readyz(fleet.replicas[holder].url)["coordination"]["replica"] == lease["replica"]
            owner.append(holder)
            fleet.kill(holder)

        fleet.lb.reset_log()
        outcomes = herd(url, 6, on_start=kill_the_owner)
        for outcome in outcomes:
            # Never a clean end with wrong bytes: either all of it, verified, or an abort.
            assert outcome.aborted or outcome.status != 200 or outcome.body == data, outcome.error
        on_owner = [r for r in fleet.lb.requests() if r.server == fleet.name(owner[0]) and digest in r.path]
        assert on_owner and all(r.bytes < len(data) for r in on_owner), on_owner
        assert sum(o.aborted for o in outcomes) >= len(on_owner)

        # Retries through haproxy succeed once another replica has taken the download over.
        for _ in range(len(outcomes)):
            for _attempt in range(20):
                retry = get(url, timeout=60)
                if not retry.aborted and retry.status == 200:
                    break
                time.sleep(0.5)
            assert retry.status == 200 and retry.body == data, (retry.status, retry.error)
        # Nothing half-written is visible: every replica, the killed one restarted, serves the whole blob.
        fleet.restart(owner[0])
        for proxy in fleet.replicas:
            assert get(f"{proxy.url}/v2/library/kill/blobs/{digest}").body == data
        assert 2 <= faulty.gets(digest) <= 3, faulty.gets(digest)


# --------------------------------------------------------------------------- outages


def _pull(base: str, name: str, manifest: str, blobs: list[str], data: dict[str, bytes]) -> None:
    """Manifest by ``manifest`` (tag or digest) and every blob by digest, each checked."""
    with httpx.Client(base_url=base, timeout=60) as client:
        answer = client.get(
            f"/v2/{name}/manifests/{manifest}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
        )
        assert answer.status_code == 200, answer.text
        for digest in blobs:
            blob = client.get(f"/v2/{name}/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data[digest], (digest, blob.status_code, blob.text[:200])


def test_redis_stopped_replicas_serve_by_digest_say_degraded_and_recover_when_it_returns(
    faulty: FaultyRegistry,
) -> None:
    manifest, blobs = faulty.add_image("library/app", "1", [300_000, 200_000])
    data = {digest: faulty.blob(digest) for digest in blobs}
    with Fleet({"cache": {"tag_ttl": "1s"}}, upstream_url=faulty.url) as fleet:
        for proxy in fleet.replicas:
            _pull(proxy.url, "library/app", "1", blobs, data)
        gets = {digest: faulty.gets(digest) for digest in blobs}
        fleet.stop_redis()
        try:
            time.sleep(1.5)  # past tag_ttl: the tag is asked again
            for proxy in fleet.replicas:
                _pull(proxy.url, "library/app", manifest, blobs, data)
                _pull(proxy.url, "library/app", "1", blobs, data)
                ready = httpx.get(f"{proxy.url}/readyz", timeout=10)
                # Still in the rotation (200), but saying what is missing.
                assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
                assert "redis" in " ".join(ready.json()["degraded"]).lower(), ready.text
            _pull(fleet.url, "library/app", "1", blobs, data)
        finally:
            fleet.start_redis()
        for proxy in fleet.replicas:
            readyz = f"{proxy.url}/readyz"
            wait_for("ready again", lambda url=readyz: httpx.get(url, timeout=10).json()["status"] == "ok")
            _pull(proxy.url, "library/app", "1", blobs, data)
        assert {digest: faulty.gets(digest) for digest in blobs} == gets, "cached blobs were fetched again"


def test_object_store_stopped_local_tiers_still_serve_the_rest_is_503_and_nothing_is_lost(
    faulty: FaultyRegistry,
) -> None:
    manifest, blobs = faulty.add_image("library/store", "1", [300_000])
    data = {digest: faulty.blob(digest) for digest in blobs}
    with Fleet(upstream_url=faulty.url) as fleet:
        first, other = fleet.replicas[0], fleet.replicas[1]
        _pull(first.url, "library/store", manifest, blobs, data)  # in the bucket and in replica 0's local tier
        gets = {digest: faulty.gets(digest) for digest in blobs}
        fleet.stop_store()
        try:
            _pull(first.url, "library/store", manifest, blobs, data)
            for digest in blobs:
                answer = httpx.get(f"{other.url}/v2/library/store/blobs/{digest}", timeout=60)
                assert answer.status_code == 503, (answer.status_code, answer.text[:300])
                assert answer.json()["errors"][0]["code"]
        finally:
            fleet.start_store()
        for proxy in fleet.replicas:
            _pull(proxy.url, "library/store", manifest, blobs, data)
        assert {digest: faulty.gets(digest) for digest in blobs} == gets, "the bucket lost what it held"


def test_a_replica_restarted_with_an_empty_local_disk_serves_the_fleet_cache_at_once(
    faulty: FaultyRegistry,
) -> None:
    manifest, blobs = faulty.add_image("library/restart", "1", [500_000, 100_000])
    data = {digest: faulty.blob(digest) for digest in blobs}
    with Fleet(upstream_url=faulty.url) as fleet:
        _pull(fleet.replicas[0].url, "library/restart", manifest, blobs, data)
        gets = {digest: faulty.gets(digest) for digest in blobs}
        fleet.restart(1, empty_local=True)
        _pull(fleet.replicas[1].url, "library/restart", manifest, blobs, data)
        assert {digest: faulty.gets(digest) for digest in blobs} == gets


def test_with_redirect_cached_blobs_answer_307_to_the_bucket_and_skopeo_follows_it_through_haproxy(
    upstream: Registry, tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    alpine = images["alpine"]
    with Fleet(upstream_url=upstream.url, storage={"redirect": True}) as fleet:
        ref = f"docker://{fleet.host}/{alpine.repo}:{alpine.tag}"
        skopeo_copy(ref, f"dir:{tmp_path / 'cold'}")  # cold: streamed by the replicas, now in the bucket
        fleet.lb.reset_log()
        skopeo_copy(ref, f"dir:{tmp_path / 'warm'}")
        assert_same_image(tmp_path / "warm", alpine)
        blob_answers = {r.status for r in fleet.lb.requests() if "/blobs/" in r.path and r.method == "GET"}
        assert blob_answers == {307}, fleet.lb.requests()
        layer = (alpine.child() if alpine.is_index else alpine).blobs[-1]
        moved = httpx.get(f"{fleet.url}/v2/{alpine.repo}/blobs/{layer.digest}", timeout=30)
        assert moved.status_code == 307 and moved.headers["location"].startswith(fleet.store.endpoint)
        whole = httpx.get(moved.headers["location"], timeout=30).content
        assert sha256(whole) == layer.digest
        tail = httpx.get(moved.headers["location"], headers={"Range": "bytes=-100"}, timeout=30)
        assert (tail.status_code, tail.content) == (206, whole[-100:])  # Range works through the URL


# --------------------------------------------------------------------------- hosted


def test_a_push_through_one_replica_is_pulled_through_another(upstream: Registry, tmp_path: Path) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    with Fleet(HOSTED, upstream_url=upstream.url) as fleet:
        alpine, multi = images["alpine"], images["multi"]
        # One push straight to replica 0, one through haproxy (its uploads' requests land on every replica).
        skopeo_copy(
            f"docker://{upstream.host}/{alpine.repo}:{alpine.tag}", f"docker://{fleet.replicas[0].host}/acme/alpine:1"
        )
        skopeo_copy(
            f"docker://{upstream.host}/{multi.repo}:{multi.tag}", f"docker://{fleet.host}/acme/multi:1", all=True
        )
        for index in (1, 2):
            host = fleet.replicas[index].host
            skopeo_copy(f"docker://{host}/acme/alpine:1", f"dir:{tmp_path / f'alpine{index}'}")
            assert_same_image(tmp_path / f"alpine{index}", alpine)
            skopeo_copy(f"docker://{host}/acme/multi:1", f"dir:{tmp_path / f'multi{index}'}", all=True)
            assert_same_image(tmp_path / f"multi{index}", multi, all_platforms=True)
