"""Leases in Redis: which replica of a fleet downloads a blob from the upstream.

The replica that takes `pullproxy:lease:<digest>` (SET NX PX) fetches; the others read
its holder (replica id and URL) and follow that replica's download over a peer request
(`proxy.fleet.peer`). The holder renews the lease while its download runs and releases
it at the end; a holder that dies stops renewing, so the lease expires within `TTL` and
the next request for the blob takes it over. Renewal and release only touch a lease the
replica still holds (compare-and-set in Lua), never one another replica took since.

Redis is a help, not a dependency: every call has short timeouts and no retries, and
when Redis cannot be reached the answer is `Claim.ALONE` — this replica fetches on its
own, as it would without coordination — for a short pause before Redis is asked again,
so an outage does not add a timeout to every cold blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.fleet.peers import Replica

log = structlog.get_logger("pullproxy")

PREFIX = "pullproxy:lease:"
TTL = 5.0  # seconds a lease lives without renewal: how long a dead holder keeps others waiting
RENEW_EVERY = 1.0  # seconds between renewals while the download runs
TIMEOUT = 0.5  # seconds for a Redis connection or command: a lease is worth less than a slow answer
UNREACHABLE_PAUSE = 2.0  # seconds Redis is not asked again after it could not be reached

# Only the holder may extend or delete its lease (another replica may hold the key by now).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Claim(enum.Enum):
    """What asking for a lease came to."""

    TAKEN = "taken"  # this replica holds it: fetch from the upstream
    HELD = "held"  # another replica holds it: follow that one's download
    ALONE = "alone"  # Redis could not be reached: fetch on its own


@dataclass(frozen=True, slots=True)
class Holder:
    """The replica that holds a lease, as others read it."""

    replica: str
    url: str


def connect(url: str) -> aioredis.Redis:
    """A client for leases: short timeouts, no retries (a retry would only delay the fallback)."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return client


class Lease:
    """A lease this replica holds; `release()` it when the download ends, whatever its outcome."""

    def __init__(self, leases: Leases, digest: str, token: str) -> None:
        self._leases = leases
        self.digest = digest
        self.key = PREFIX + digest
        self._token = token
        self.lost = False  # renewal found another holder (or none): others may be fetching too
        self._renewing: asyncio.Task[None] | None = asyncio.create_task(self._renew(), name=f"lease {digest}")

    async def _renew(self) -> None:
        leases = self._leases
        while True:
            await asyncio.sleep(leases.renew_every)
            try:
                kept = await leases._renew_script(keys=[self.key], args=[self._token, int(leases.ttl * 1000)])
            except (RedisError, OSError) as exc:  # it lives on until the TTL: renewal may work next time
                log.info("lease renewal failed", digest=self.digest, why=str(exc))
                continue
            if kept:
                continue
            try:  # gone (Redis restarted empty, say) rather than taken: take it again
                if await leases._redis.set(self.key, self._token, nx=True, px=int(leases.ttl * 1000)):
                    continue
            except (RedisError, OSError):
                continue
            self.lost = True
            log.warning("lease lost while downloading; another replica may fetch too", digest=self.digest)
            return

    async def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (else it expires on its own)."""
        renewing, self._renewing = self._renewing, None
        if renewing is None:
            return
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        try:
            await self._leases._release_script(keys=[self.key], args=[self._token])
        except (RedisError, OSError) as exc:
            log.info("lease release failed; it expires", digest=self.digest, why=str(exc))


class Leases:
    """Leases per digest in one Redis, taken in the name of `replica`."""

    def __init__(
        self, client: aioredis.Redis, replica: Replica, ttl: float = TTL, renew_every: float = RENEW_EVERY
    ) -> None:
        self._redis = client
        self.replica = replica
        self.ttl = ttl
        self.renew_every = renew_every
        self._token = json.dumps({"replica": replica.id, "url": replica.url}, separators=(",", ":"))
        self._renew_script = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)
        self._pause_until = 0.0

    async def claim(self, digest: str) -> tuple[Claim, Lease | Holder | None]:
        """Take the lease of `digest`, or say who holds it: (TAKEN, Lease), (HELD, Holder) or (ALONE, None)."""
        if time.monotonic() < self._pause_until:
            return Claim.ALONE, None
        key = PREFIX + digest
        try:
            for _ in range(2):  # the holder may release between our SET and GET
                if await self._redis.set(key, self._token, nx=True, px=int(self.ttl * 1000)):
                    return Claim.TAKEN, Lease(self, digest, self._token)
                value = await self._redis.get(key)
                if value is not None:
                    return Claim.HELD, _holder(value)
        except (RedisError, OSError) as exc:
            self._pause_until = time.monotonic() + UNREACHABLE_PAUSE
            log.warning("Redis unreachable: fetching without the fleet's lease", digest=digest, why=str(exc))
            return Claim.ALONE, None
        return Claim.ALONE, None  # taken and released twice while we looked: not worth a third try

    async def holder(self, digest: str) -> Holder | None:
        """Who holds the lease of `digest` now (None: nobody, or Redis could not be reached)."""
        try:
            value = await self._redis.get(PREFIX + digest)
        except (RedisError, OSError):
            return None
        return None if value is None else _holder(value)

    async def held_by(self, digest: str, holder: Holder) -> bool | None:
        """Whether `holder` still holds the lease of `digest`; None when Redis cannot tell."""
        try:
            value = await self._redis.get(PREFIX + digest)
        except (RedisError, OSError):
            return None
        return value is not None and _holder(value) == holder

    async def aclose(self) -> None:
        await self._redis.aclose()


def _holder(value: bytes | str) -> Holder:
    """A lease's value; one this code did not write reads as a holder nobody can reach."""
    try:
        data = json.loads(value)
        return Holder(str(data["replica"]), str(data["url"]))
    except (ValueError, KeyError, TypeError):
        return Holder("", "")
