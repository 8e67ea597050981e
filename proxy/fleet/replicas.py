"""Which replicas are alive: each one's heartbeat in the fleet's Redis.

Every `HEARTBEAT` seconds a replica writes its record (id, advertised URL, start time, last
heartbeat) under `pullproxy:replica:<id>`, expiring after `EXPIRES` seconds, and lists it in
the sorted set `pullproxy:replicas` (scored by last heartbeat); then it reads every live
record back. A replica that stops beating drops out within `EXPIRES`, whether it left
cleanly (it deletes its record) or was killed. The heartbeat runs on the event loop with
redis-py's asyncio client and short timeouts, so it never holds up a request; it also tells
this process whether Redis answers (`RedisHealth`, shared with `RedisMetadata`), which
`/readyz` and the status page report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import cast

import redis.asyncio
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache.redis_meta import COMMAND_TIMEOUT, CONNECT_TIMEOUT, UNREACHABLE, RedisHealth
from proxy.fleet.peers import Replica
from proxy.ops import metrics

log = structlog.get_logger("pullproxy")

HEARTBEAT = 3.0  # seconds between a replica's heartbeats
EXPIRES = 15.0  # seconds without one after which a replica is taken as gone
LISTED = 256  # replicas read back at most (a fleet is a handful; this bounds a bad Redis)
MEMBERS = "pullproxy:replicas"
RECORD = "pullproxy:replica:"


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """A live replica as the fleet sees it (wall clock times, as each replica's clock says)."""

    id: str
    url: str
    started: float
    last_seen: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def parse(cls, value: bytes | str) -> ReplicaRecord | None:
        try:
            data = json.loads(value)
            return cls(str(data["id"]), str(data["url"]), float(data["started"]), float(data["last_seen"]))
        except (ValueError, KeyError, TypeError):
            return None  # not ours, or from another version: not listed


def connect(url: str) -> redis.asyncio.Redis:
    """An asyncio client with the same short timeouts as the metadata's (see `cache.redis_meta.connect`)."""
    return redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 1)
    )


async def live_replicas(client: redis.asyncio.Redis) -> list[ReplicaRecord]:
    """Every replica whose heartbeat has not expired, oldest first; raises redis' errors when it cannot be reached."""
    ids = cast(list[bytes | str], await client.zrevrange(MEMBERS, 0, LISTED - 1))
    if not ids:
        return []
    values = await client.mget([RECORD + (i.decode() if isinstance(i, bytes) else i) for i in ids])
    records = [ReplicaRecord.parse(value) for value in values if value is not None]
    return sorted((r for r in records if r is not None), key=lambda r: (r.started, r.id))


class ReplicaRegistry:
    """This replica's heartbeat, and the fleet as of its last one (`live`)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        replica: Replica,
        health: RedisHealth | None = None,
        after_beat: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.client = client
        self.after_beat = after_beat  # run after each heartbeat that reached Redis
        self.replica = replica
        self.health = health or RedisHealth()
        self.started = time.time()
        self.live: tuple[ReplicaRecord, ...] = ()  # as of the last heartbeat that reached Redis
        self._down = False

    def record(self, now: float) -> ReplicaRecord:
        return ReplicaRecord(self.replica.id, self.replica.url, self.started, now)

    async def beat(self) -> bool:
        """One heartbeat: write this replica's record, read the live ones. False if Redis did not answer."""
        now = time.time()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(RECORD + self.replica.id, json.dumps(self.record(now).to_json()), px=int(EXPIRES * 1000))
                pipe.zadd(MEMBERS, {self.replica.id: now})
                pipe.zremrangebyscore(MEMBERS, "-inf", now - 4 * EXPIRES)  # long gone (clocks may differ a bit)
                await pipe.execute()
            live = await live_replicas(self.client)
        except UNREACHABLE as exc:
            what = f"{type(exc).__name__}: {exc}"
            self.health.failed(what)
            metrics.REDIS_UP.set(0)
            if not self._down:
                log.warning("redis unreachable: tags are asked upstream, links confirmed upstream", why=what)
            self._down = True
            return False
        self.health.ok()
        metrics.REDIS_UP.set(1)
        metrics.FLEET_REPLICAS.set(len(live))
        if self._down:
            log.info("redis answers again", replicas=len(live))
        self._down = False
        self.live = tuple(live)
        if self.after_beat is not None:
            try:
                await self.after_beat()
            except Exception:
                log.exception("after the heartbeat")
        return True

    async def run(self) -> None:
        """Beat every `HEARTBEAT` seconds until cancelled."""
        while True:
            try:
                await self.beat()
            except Exception:  # e.g. a Redis answering errors: keep beating, the next one may do
                log.exception("heartbeat failed")
            await asyncio.sleep(HEARTBEAT)

    async def leave(self) -> None:
        """Delete this replica's record (best effort: it expires anyway) and close the client."""
        with contextlib.suppress(*UNREACHABLE):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(RECORD + self.replica.id)
                pipe.zrem(MEMBERS, self.replica.id)
                await pipe.execute()
        await self.client.aclose()

    def state(self) -> dict[str, object]:
        """For `/readyz` and the status page: Redis' state and the live replicas."""
        problem = self.health.problem
        last_error = self.health.last_error
        state = "failing" if problem else "unknown" if self.health.last_ok is None else "ok"
        return {
            "redis": {
                "state": state,
                "problem": problem,
                "last_ok": self.health.last_ok,
                "last_error": None if last_error is None else {"at": last_error[0], "what": last_error[1]},
            },
            "replica": self.replica.id,
            "replicas": [record.to_json() for record in self.live],
        }
