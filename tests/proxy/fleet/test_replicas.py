"""The replica registry against a real redis-server: replicas see each other, drop out when they
leave or stop beating, and a heartbeat that cannot reach Redis says so without raising."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cache.redis_meta import RedisHealth
from proxy.fleet import replicas
from proxy.fleet.peers import Replica
from proxy.fleet.replicas import ReplicaRegistry, live_replicas
from proxy.ops import metrics
from tests.support.redis_server import RedisServer


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as started:
        yield started


def test_replicas_see_each_other_and_drop_out_when_they_leave(server: RedisServer) -> None:
    async def work() -> None:
        one = ReplicaRegistry(replicas.connect(server.url), Replica("one", "http://127.0.0.1:1"))
        other = ReplicaRegistry(replicas.connect(server.url), Replica("other", "http://127.0.0.1:2"))
        assert await one.beat() and await other.beat()
        assert [r.id for r in other.live] == ["one", "other"]  # oldest first
        await one.beat()
        assert [(r.id, r.url) for r in one.live] == [("one", "http://127.0.0.1:1"), ("other", "http://127.0.0.1:2")]
        first = one.live[0]
        assert first.started == one.started and first.last_seen >= first.started
        await one.leave()
        listed = replicas.connect(server.url)
        assert [r.id for r in await live_replicas(listed)] == ["other"]
        await other.leave()
        assert await live_replicas(listed) == []
        await listed.aclose()

    asyncio.run(work())


def test_a_replica_that_stops_beating_expires(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas, "EXPIRES", 0.3)

    async def work() -> None:
        gone = ReplicaRegistry(replicas.connect(server.url), Replica("gone", "http://127.0.0.1:1"))
        assert await gone.beat()  # then killed: it never leaves
        await asyncio.sleep(0.5)
        alive = ReplicaRegistry(replicas.connect(server.url), Replica("alive", "http://127.0.0.1:2"))
        assert await alive.beat()
        assert [r.id for r in alive.live] == ["alive"]
        await alive.leave()
        await gone.client.aclose()

    asyncio.run(work())


def test_a_heartbeat_without_redis_reports_it_and_recovers_when_redis_is_back(server: RedisServer) -> None:
    health = RedisHealth()

    async def work() -> None:
        registry = ReplicaRegistry(replicas.connect(server.url), Replica("one", "http://127.0.0.1:1"), health)
        assert registry.state()["redis"] == {"state": "unknown", "problem": None, "last_ok": None, "last_error": None}
        assert await registry.beat()
        assert registry.state()["redis"]["state"] == "ok"  # type: ignore[index]
        assert metrics.REGISTRY.get_sample_value("pullproxy_redis_up") == 1
        assert metrics.REGISTRY.get_sample_value("pullproxy_fleet_replicas") == 1
        server.stop()
        started = time.monotonic()
        assert not await registry.beat()
        assert time.monotonic() - started < 5  # short timeouts: never a hang
        state = registry.state()
        assert state["redis"]["state"] == "failing" and "Connection" in state["redis"]["problem"]  # type: ignore[index]
        assert [r.id for r in registry.live] == ["one"]  # the last known fleet, still shown
        assert metrics.REGISTRY.get_sample_value("pullproxy_redis_up") == 0
        server.start()
        assert await registry.beat()  # the same client reconnects
        assert health.problem is None
        await registry.leave()

    asyncio.run(work())
