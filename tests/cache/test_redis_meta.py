"""`RedisMetadata` against a real redis-server: what one replica learns the others see, levels only
rise, referrers stay bounded, and an unreachable Redis fails fast with `MetadataUnavailable`."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cache import redis_meta
from cache.redis_meta import RedisMetadata, connect
from cache.storage import EXPANDED, LINKED, MetadataUnavailable
from tests.support.redis_server import RedisServer

D1, D2, D3 = (f"sha256:{n:064x}" for n in (1, 2, 3))


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as started:
        yield started


@pytest.fixture
def replicas(server: RedisServer) -> Iterator[tuple[RedisMetadata, RedisMetadata]]:
    """Two replicas' metadata on one (emptied) Redis."""
    if not server.running:
        server.start()
    connect(server.url).flushdb()
    first, second = RedisMetadata(connect(server.url)), RedisMetadata(connect(server.url))
    yield first, second
    first.close()
    second.close()


def test_a_tag_one_replica_confirmed_is_found_by_another_with_the_same_checked_at(
    replicas: tuple[RedisMetadata, RedisMetadata],
) -> None:
    one, other = replicas
    record = one.set_tag("docker.io", "library/alpine", "3", D1)
    assert other.cached_tag("docker.io", "library/alpine", "3") is None  # memory only: not there yet
    assert other.find_tag("docker.io", "library/alpine", "3") == record
    assert other.cached_tag("docker.io", "library/alpine", "3") == record  # now in its memory
    assert other.find_tag("docker.io", "library/alpine", "4") is None
    assert other.find_tag("quay.io", "library/alpine", "3") is None  # keyed by upstream too


def test_tag_lists_and_repositories_follow_set_and_remove(replicas: tuple[RedisMetadata, RedisMetadata]) -> None:
    one, other = replicas
    one.set_tag("docker.io", "library/alpine", "3", D1)
    one.set_tag("docker.io", "library/alpine", "edge", D2)
    one.set_tag("ghcr/io:odd", "team/app", "1", D3)  # an upstream name with / and : in it
    assert other.known_tags("docker.io", "library/alpine") == ["3", "edge"]
    assert other.repositories() == [("docker.io", "library/alpine"), ("ghcr/io:odd", "team/app")]
    other.remove_tag("docker.io", "library/alpine", "3")
    assert one.known_tags("docker.io", "library/alpine") == ["edge"]
    assert one.find_tag("docker.io", "library/alpine", "3") is None
    other.remove_tag("docker.io", "library/alpine", "edge")
    assert one.repositories() == [("ghcr/io:odd", "team/app")]


def test_link_levels_only_rise_whoever_writes_last(replicas: tuple[RedisMetadata, RedisMetadata]) -> None:
    one, other = replicas
    one.add_links("docker.io", "team/app", {D1: EXPANDED, D2: LINKED})
    other.add_links("docker.io", "team/app", {D1: LINKED, D2: LINKED, D3: LINKED})  # an older view of D1
    assert other.cached_link("docker.io", "team/app", D1) == EXPANDED  # the script answered the stored level
    assert [one.find_link("docker.io", "team/app", d) for d in (D1, D2, D3)] == [EXPANDED, LINKED, LINKED]
    assert one.find_link("docker.io", "other/app", D1) == 0
    assert one.cached_link("docker.io", "other/app", D1) == 0


def test_concurrent_link_writers_never_lower_a_level(
    server: RedisServer, replicas: tuple[RedisMetadata, RedisMetadata]
) -> None:
    one, other = replicas
    digests = [f"sha256:{n:064x}" for n in range(200)]

    def write(meta: RedisMetadata, level: int) -> None:
        for digest in digests:
            meta.add_links("docker.io", "team/app", {digest: level})

    threads = [
        threading.Thread(target=write, args=(one, EXPANDED)),
        threading.Thread(target=write, args=(other, LINKED)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    fresh = RedisMetadata(connect(server.url))
    assert {fresh.find_link("docker.io", "team/app", d) for d in digests} == {EXPANDED}
    fresh.close()


def test_referrers_are_shared_and_none_is_kept_apart_from_unknown(
    replicas: tuple[RedisMetadata, RedisMetadata],
) -> None:
    one, other = replicas
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert other.referrers("docker.io", "team/app", D1) is None
    before = time.time()
    one.set_referrers("docker.io", "team/app", D1, index)
    one.set_referrers("docker.io", "team/app", D2, None)
    got = other.referrers("docker.io", "team/app", D1)
    assert got is not None and got.body == index and got.checked_at >= before
    none = other.referrers("docker.io", "team/app", D2)
    assert none is not None and none.body is None
    other.remember_no_referrers("docker.io", "team/app", D1)  # gone upstream: the stored index is deleted
    assert one.referrers("docker.io", "team/app", D1) is None
    remembered = other.referrers("docker.io", "team/app", D1)
    assert remembered is not None and remembered.body is None


def test_stored_referrers_are_bounded_the_oldest_going_first(server: RedisServer) -> None:
    client = connect(server.url)
    client.flushdb()
    meta = RedisMetadata(client, referrers_size=256 << 10)
    try:
        index = json.dumps({"schemaVersion": 2, "annotations": {"pad": "x" * 1000}}).encode()
        for number in range(2000):  # about 2 MiB of indexes
            meta.set_referrers("up", "team/app", f"sha256:{number:064x}", index)
        assert meta.referrers("up", "team/app", f"sha256:{1999:064x}") is not None
        assert meta.referrers("up", "team/app", f"sha256:{0:064x}") is None
        stored = client.hlen(redis_meta.PREFIX + "referrers")
        assert 0 < stored < 300
        assert int(client.get(redis_meta.PREFIX + "referrers:bytes") or 0) <= 256 << 10
        assert client.zcard(redis_meta.PREFIX + "referrers:stored") == stored
    finally:
        meta.close()


def test_unreachable_redis_fails_fast_keeps_what_was_learnt_and_writes_links_later(server: RedisServer) -> None:
    client = connect(server.url)
    client.flushdb()
    meta = RedisMetadata(client)
    try:
        meta.set_tag("docker.io", "team/app", "1", D1)
        server.stop()
        with pytest.raises(MetadataUnavailable, match="redis"):
            meta.find_tag("docker.io", "team/app", "1")
        assert meta.health.problem is not None
        started = time.monotonic()
        for _ in range(100):  # within RETRY_AFTER: no connection attempt at all
            with pytest.raises(MetadataUnavailable):
                meta.find_link("docker.io", "team/app", D1)
        assert time.monotonic() - started < redis_meta.RETRY_AFTER
        assert meta.cached_tag("docker.io", "team/app", "1") is not None  # memory still answers the hot path
        with pytest.raises(MetadataUnavailable):
            meta.add_links("docker.io", "team/app", {D2: EXPANDED})
        assert meta.cached_link("docker.io", "team/app", D2) == EXPANDED  # kept in memory meanwhile
        with pytest.raises(MetadataUnavailable):
            meta.set_tag("docker.io", "team/app", "1", D2)
        assert meta.cached_tag("docker.io", "team/app", "1").digest == D2  # type: ignore[union-attr]
        server.start()  # an empty Redis: no persistence
        time.sleep(redis_meta.RETRY_AFTER + 0.1)
        assert meta.find_tag("docker.io", "team/app", "1") is None  # answers again, no reconnect by hand
        assert meta.health.problem is None
        other = RedisMetadata(connect(server.url))
        assert other.find_link("docker.io", "team/app", D2) == EXPANDED  # the pending link was written
        other.close()
    finally:
        if not server.running:
            server.start()
        meta.close()


def test_one_replica_claims_the_check_of_a_stale_tag_record(replicas: tuple[RedisMetadata, RedisMetadata]) -> None:
    one, other = replicas
    assert one.claim_tag_check("docker.io", "team/app", "1", 100.0, 0.3)
    assert not other.claim_tag_check("docker.io", "team/app", "1", 100.0, 0.3)  # someone is asking already
    assert other.claim_tag_check("docker.io", "team/app", "2", 100.0, 0.3)  # another tag
    assert other.claim_tag_check("docker.io", "team/app", "1", 200.0, 0.3)  # a newer record: a new check
    time.sleep(0.4)
    assert other.claim_tag_check("docker.io", "team/app", "1", 100.0, 0.3)  # the claim expired


class Silent:
    """A listener on loopback that accepts connections and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_redis_that_hangs_holds_up_one_caller_at_a_time() -> None:
    silent = Silent()
    meta = RedisMetadata(connect(silent.url))
    try:
        with pytest.raises(MetadataUnavailable):
            meta.find_tag("up", "team/app", "1")  # times out (short timeouts)
        time.sleep(redis_meta.RETRY_AFTER + 0.1)
        connections = len(silent.accepted)
        probe = threading.Thread(target=_try, args=(meta,))
        probe.start()
        deadline = time.monotonic() + 5
        while len(silent.accepted) == connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(silent.accepted) > connections  # the probe is waiting on the silent Redis
        time.sleep(redis_meta.RETRY_AFTER + 0.1)  # longer than the pause after a failure
        during = len(silent.accepted)
        with pytest.raises(MetadataUnavailable):
            meta.find_link("up", "team/app", D1)
        assert len(silent.accepted) == during and probe.is_alive()  # failed at once: no second probe
        probe.join(timeout=10)
    finally:
        meta.close()
        silent.close()


def _try(meta: RedisMetadata) -> None:
    with contextlib.suppress(MetadataUnavailable):
        meta.find_tag("up", "team/app", "1")


def test_a_call_to_a_redis_that_hangs_gives_up_within_two_timeouts() -> None:
    silent = Silent()
    meta = RedisMetadata(connect(silent.url))
    try:
        with pytest.raises(MetadataUnavailable, match="Timeout"):
            meta.find_tag("up", "team/app", "1")
        assert len(silent.accepted) <= 2  # one attempt and one retry, each bounded by COMMAND_TIMEOUT
    finally:
        meta.close()
        silent.close()
