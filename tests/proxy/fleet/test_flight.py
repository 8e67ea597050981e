"""Three `pullproxy serve` replicas sharing a Redis fetch a cold blob from the upstream once.

Each replica has its own disk cache; the one that takes the blob's lease downloads it, the
others follow its download over peer requests and stream it to their clients as it arrives.
The upstream is slowed so the download takes seconds; progress is read from the owner's
metrics (bytes fetched from the upstream), never from a clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support.faulty import FaultyRegistry, pseudo_random_bytes
from tests.support.ports import free_port
from tests.support.proxy import Proxy
from tests.support.redis_server import RedisServer

SECRET_ENV = "PULLPROXY_TEST_PEER_SECRET"
SIZE = 2 << 20
RATE = 512 << 10  # bytes per second from the upstream: the download takes about four seconds
CLIENTS = 24


@dataclass
class Fleet:
    upstream: FaultyRegistry
    redis: RedisServer
    replicas: list[Proxy]

    def owner(self, digest: str) -> Proxy:
        """The replica holding the blob's lease, once one took it."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            for _ in range(400):
                value = client.get(f"pullproxy:lease:{digest}")
                if value is not None:
                    url = json.loads(value)["url"]
                    return next(replica for replica in self.replicas if replica.url == url)
                time.sleep(0.025)
        finally:
            client.close()
        raise AssertionError(f"no replica took the lease of {digest}")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with FaultyRegistry() as upstream, RedisServer() as server:
        replicas: list[Proxy] = []
        try:
            for _ in range(3):
                listen = f"127.0.0.1:{free_port()}"
                config = {
                    "server": {"listen": listen},
                    "upstream": [{"name": "docker.io", "url": upstream.url, "default": True}],
                    "coordination": {
                        "redis": server.url,
                        "advertise_url": f"http://{listen}",
                        "peer_secret_env": SECRET_ENV,
                    },
                }
                replicas.append(Proxy(config, env={SECRET_ENV: "the fleet's secret"}))
            yield Fleet(upstream, server, replicas)
        finally:
            for replica in replicas:
                replica.close()


@dataclass
class Pull:
    """One client's GET of a blob, in a thread: what it received, and how it ended."""

    url: str
    received: int = 0
    status: int | None = None
    digest: str | None = None  # of the whole body, when it ended cleanly
    error: str | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        hashed = hashlib.sha256()
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(60, connect=5)) as response:
                self.status = response.status_code
                for chunk in response.iter_raw():
                    hashed.update(chunk)
                    self.received += len(chunk)
            self.digest = "sha256:" + hashed.hexdigest()
        except httpx.HTTPError as exc:
            self.error = type(exc).__name__

    def join(self) -> None:
        self.thread.join(timeout=90)
        assert not self.thread.is_alive(), f"{self.url} still pulling"


def _metric(replica: Proxy, name: str, **labels: str) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _fleet_counts(replica: Proxy) -> tuple[float, ...]:
    fetches = [_metric(replica, "pullproxy_fleet_fetches_total", by=by) for by in ("self", "peer", "alone")]
    return (*fetches, _metric(replica, "pullproxy_fleet_lease_waits_total"))


def _fetched(replica: Proxy) -> float:
    return _metric(replica, "pullproxy_upstream_fetched_bytes_total")


def _slow_blob(fleet: Fleet, seed: str) -> tuple[bytes, str]:
    data = pseudo_random_bytes(seed, SIZE)
    digest = fleet.upstream.add_blob(data)
    fleet.upstream.slow(method="GET", digest=digest, bytes_per_sec=RATE, chunk_size=16 << 10)
    return data, digest


def _pulls(fleet: Fleet, digest: str) -> list[Pull]:
    return [Pull(f"{fleet.replicas[i % 3].url}/v2/library/app/blobs/{digest}") for i in range(CLIENTS)]


def _wait_half_fetched(owner: Proxy) -> float:
    for _ in range(600):
        fetched = _fetched(owner)
        if fetched >= SIZE / 2:
            return fetched
        time.sleep(0.02)
    raise AssertionError("the owner's download never got half way")


def _upstream_gets(fleet: Fleet, digest: str) -> int:
    return fleet.upstream.count("GET", f"/blobs/{digest}")


def test_replicas_fetch_a_cold_blob_once_and_followers_stream_it_as_it_arrives(fleet: Fleet) -> None:
    _, digest = _slow_blob(fleet, "fleet-once")
    before = {replica.url: _fetched(replica) for replica in fleet.replicas}
    counted = {replica.url: _fleet_counts(replica) for replica in fleet.replicas}
    pulls = _pulls(fleet, digest)
    owner = fleet.owner(digest)
    _wait_half_fetched(owner)
    received = [pull.received for pull in pulls]
    assert _fetched(owner) - before[owner.url] < SIZE, "the snapshot came too late: the download was over"
    for pull in pulls:
        pull.join()
    assert all(count > 0 for count in received), f"clients with no byte half way through: {received}"
    assert [(pull.status, pull.digest, pull.error) for pull in pulls] == [(200, digest, None)] * CLIENTS
    assert _upstream_gets(fleet, digest) == 1
    followers = [replica for replica in fleet.replicas if replica is not owner]
    changed = {
        replica.url: tuple(a - b for a, b in zip(_fleet_counts(replica), counted[replica.url], strict=True))
        for replica in fleet.replicas
    }
    # (self, peer, alone, lease waits): one transfer per follower replica, however many clients it has
    assert changed == {owner.url: (1, 0, 0, 0), **{follower.url: (0, 1, 0, 0) for follower in followers}}
    for follower in followers:
        assert _fetched(follower) == before[follower.url]  # nothing from the upstream
        # Each follower keeps the blob: served from its own cache now, without the owner.
        again = httpx.get(f"{follower.url}/v2/library/app/blobs/{digest}", timeout=30)
        assert again.status_code == 200 and "sha256:" + hashlib.sha256(again.content).hexdigest() == digest
    assert _upstream_gets(fleet, digest) == 1


def test_a_range_of_a_cold_blob_is_still_asked_of_the_upstream(fleet: Fleet) -> None:
    data = pseudo_random_bytes("fleet-range", 256 << 10)
    digest = fleet.upstream.add_blob(data)
    first = fleet.replicas[0]
    answer = httpx.get(f"{first.url}/v2/library/app/blobs/{digest}", headers={"Range": "bytes=100-199"}, timeout=30)
    assert (answer.status_code, answer.content) == (206, data[100:200])
    asked = [r for r in fleet.upstream.requests() if r.method == "GET" and r.path.endswith(digest)]
    assert [r.headers.get("range") for r in asked][:1] == ["bytes=100-199"]
    whole = httpx.get(f"{first.url}/v2/library/app/blobs/{digest}", timeout=30)  # the background download's
    assert whole.content == data
    asked = [r for r in fleet.upstream.requests() if r.method == "GET" and r.path.endswith(digest)]
    assert sum("range" not in r.headers for r in asked) == 1


def test_followers_of_an_owner_that_hangs_give_up_once_its_lease_is_gone(fleet: Fleet) -> None:
    """SIGSTOP: no connection closes, the owner just stops renewing. Its followers' clients abort
    within a bound far below the peer read timeout (60 s), and a retry elsewhere takes over."""
    data, digest = _slow_blob(fleet, "fleet-owner-hangs")
    pulls = _pulls(fleet, digest)
    owner = fleet.owner(digest)
    _wait_half_fetched(owner)
    assert owner.pid is not None
    os.killpg(owner.pid, signal.SIGSTOP)
    try:
        followed = [pull for pull in pulls if not pull.url.startswith(owner.url)]
        bound = time.monotonic() + 30  # half the peer read timeout
        for pull in followed:
            pull.thread.join(timeout=max(0.0, bound - time.monotonic()))
        assert not any(pull.thread.is_alive() for pull in followed), "followers still wait for a hung owner"
        assert all(pull.error is not None and pull.received < SIZE for pull in followed)
        follower = next(replica for replica in fleet.replicas if replica is not owner)
        retry = httpx.get(f"{follower.url}/v2/library/app/blobs/{digest}", timeout=60)
        assert retry.status_code == 200 and retry.content == data
        assert _upstream_gets(fleet, digest) == 2
    finally:
        os.killpg(owner.pid, signal.SIGCONT)
    for pull in pulls:  # the owner's own clients resume once it does
        pull.join()
    assert all(pull.digest == digest for pull in pulls if pull.url.startswith(owner.url))


def test_an_owner_dying_mid_download_aborts_every_client_and_a_retry_takes_over(fleet: Fleet) -> None:
    data, digest = _slow_blob(fleet, "fleet-owner-dies")
    pulls = _pulls(fleet, digest)
    owner = fleet.owner(digest)
    _wait_half_fetched(owner)
    for _ in range(500):  # every client is being served when the owner dies
        if all(pull.received > 0 for pull in pulls):
            break
        time.sleep(0.02)
    owner.kill()
    try:
        for pull in pulls:
            pull.join()
        clean = [pull for pull in pulls if pull.error is None]
        assert not clean, f"clients that saw a clean end: {[(p.url, p.received, p.digest) for p in clean]}"
        assert all(pull.received < SIZE for pull in pulls)
        follower = next(replica for replica in fleet.replicas if replica is not owner)
        retry = httpx.get(f"{follower.url}/v2/library/app/blobs/{digest}", timeout=60)
        assert retry.status_code == 200 and retry.content == data
        assert _upstream_gets(fleet, digest) <= 2
    finally:
        owner.start()
