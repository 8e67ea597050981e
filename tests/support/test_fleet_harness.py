"""The fleet harness: each replica its own port, local folder and advertise_url; one bucket, one Redis, haproxy."""

from __future__ import annotations

import tomllib

import httpx

from .faulty import FaultyRegistry
from .fleet import Fleet


def test_fleet_replicas_share_store_and_redis_and_a_killed_one_leaves_the_rotation() -> None:
    with FaultyRegistry() as upstream, Fleet(upstream_url=upstream.url) as fleet:
        configs = [tomllib.loads(proxy.config_path.read_text()) for proxy in fleet.replicas]
        assert [c["coordination"]["advertise_url"] for c in configs] == [p.url for p in fleet.replicas]
        assert len({c["cache"]["dir"] for c in configs}) == 3
        assert {c["coordination"]["redis"] for c in configs} == {fleet.redis_server.url}
        assert {(c["storage"]["backend"], c["storage"]["endpoint"]) for c in configs} == {("s3", fleet.store.endpoint)}
        fleet.lb.reset_log()
        for _ in range(6):
            assert httpx.get(f"{fleet.url}/v2/", timeout=10).status_code == 200
        assert fleet.lb.served_by("/v2/") == {"r0": 2, "r1": 2, "r2": 2}
        fleet.kill(1)
        assert not fleet.replicas[1].running
        fleet.lb.wait_status("r1", "DOWN")
        fleet.lb.reset_log()
        for _ in range(4):
            assert httpx.get(f"{fleet.url}/v2/", timeout=10).status_code == 200
        assert set(fleet.lb.served_by("/v2/")) == {"r0", "r2"}
        fleet.restart(1, empty_local=True)
        assert httpx.get(f"{fleet.replicas[1].url}/v2/", timeout=10).status_code == 200
