"""Blob leases in a real redis-server: one holder, renewed while it works, gone soon after it dies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.fleet import lease
from proxy.fleet.lease import Claim, Holder, Lease, Leases
from proxy.fleet.peers import Replica
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

A = Replica("a-1-x", "http://127.0.0.1:5001")
B = Replica("b-2-y", "http://127.0.0.1:5002")
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def _leases(url: str, replica: Replica, ttl: float = lease.TTL, renew_every: float = lease.RENEW_EVERY) -> Leases:
    return Leases(lease.connect(url), replica, ttl=ttl, renew_every=renew_every)


def test_one_replica_takes_a_lease_and_the_others_read_who_holds_it(server: RedisServer) -> None:
    async def main() -> None:
        a, b = _leases(server.url, A), _leases(server.url, B)
        digest = DIGEST[:-1] + "1"
        claim, taken = await a.claim(digest)
        assert claim is Claim.TAKEN and isinstance(taken, Lease)
        assert await b.claim(digest) == (Claim.HELD, Holder(A.id, A.url))
        assert await a.claim(digest) == (Claim.HELD, Holder(A.id, A.url))  # one download per digest, even here
        assert await b.holder(digest) == Holder(A.id, A.url)
        await taken.release()
        assert await b.holder(digest) is None
        claim, again = await b.claim(digest)
        assert claim is Claim.TAKEN and isinstance(again, Lease)
        await again.release()
        await a.aclose()
        await b.aclose()

    asyncio.run(main())


def test_a_renewed_lease_outlives_its_ttl_and_a_dead_holders_expires(server: RedisServer) -> None:
    async def main() -> None:
        a = _leases(server.url, A, ttl=0.5, renew_every=0.1)
        b = _leases(server.url, B, ttl=0.5, renew_every=0.1)
        digest = DIGEST[:-1] + "2"
        _, held = await a.claim(digest)
        assert isinstance(held, Lease)
        for _ in range(10):  # 1 s: twice the TTL, renewed all along
            await asyncio.sleep(0.1)
            assert (await b.claim(digest))[0] is Claim.HELD
        assert not held.lost
        assert held._renewing is not None
        held._renewing.cancel()  # the holder dies: nobody renews, nobody releases
        for _ in range(40):
            claim, taken = await b.claim(digest)
            if claim is Claim.TAKEN:
                break
            await asyncio.sleep(0.05)
        assert claim is Claim.TAKEN and isinstance(taken, Lease)
        await held.release()  # the old holder, late: the new holder's lease stays
        assert await a.holder(digest) == Holder(B.id, B.url)
        await asyncio.sleep(0.3)
        assert await a.holder(digest) == Holder(B.id, B.url)  # still renewed by B
        await taken.release()
        assert await a.holder(digest) is None
        await a.aclose()
        await b.aclose()

    asyncio.run(main())


def test_a_holder_whose_lease_was_taken_over_notices_and_leaves_it(server: RedisServer) -> None:
    async def main() -> None:
        a = _leases(server.url, A, ttl=0.3, renew_every=1.0)  # renews too late: the lease lapses first
        b = _leases(server.url, B)
        digest = DIGEST[:-1] + "3"
        _, held = await a.claim(digest)
        assert isinstance(held, Lease)
        await asyncio.sleep(0.5)
        claim, taken = await b.claim(digest)
        assert claim is Claim.TAKEN and isinstance(taken, Lease)
        for _ in range(30):
            if held.lost:
                break
            await asyncio.sleep(0.1)
        assert held.lost
        assert await a.holder(digest) == Holder(B.id, B.url)  # A's renewal did not extend B's lease as its own
        await held.release()
        assert await a.holder(digest) == Holder(B.id, B.url)
        await taken.release()
        await a.aclose()
        await b.aclose()

    asyncio.run(main())


def test_a_lease_that_vanished_with_redis_is_taken_again_by_its_holder(server: RedisServer) -> None:
    async def main() -> None:
        a = _leases(server.url, A, ttl=2.0, renew_every=0.1)
        digest = DIGEST[:-1] + "4"
        _, held = await a.claim(digest)
        assert isinstance(held, Lease)
        await a._redis.flushall()  # as a Redis restarted without persistence
        for _ in range(40):
            if await a.holder(digest) is not None:
                break
            await asyncio.sleep(0.05)
        assert await a.holder(digest) == Holder(A.id, A.url)
        assert not held.lost
        await held.release()
        await a.aclose()

    asyncio.run(main())


def test_without_redis_each_replica_fetches_alone_and_asks_again_after_a_pause() -> None:
    async def main() -> None:
        with RedisServer(start=False) as down:
            a = _leases(down.url, A)
            assert await a.claim(DIGEST) == (Claim.ALONE, None)
            assert await a.holder(DIGEST) is None
            down.start()
            assert await a.claim(DIGEST) == (Claim.ALONE, None)  # within the pause Redis is not asked
            a._pause_until = 0.0  # the pause is over
            claim, taken = await a.claim(DIGEST)
            assert claim is Claim.TAKEN and isinstance(taken, Lease)
            down.stop()
            await taken.release()  # Redis gone meanwhile: the release fails quietly, the lease would expire
            await a.aclose()

    asyncio.run(main())


def test_a_redis_that_does_not_answer_is_given_up_quickly() -> None:
    """A listener that accepts and never answers: the claim ends with ALONE after the short timeout."""
    import socket

    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(8)

        async def main() -> None:
            a = _leases(f"redis://127.0.0.1:{port}/0", A)
            assert await asyncio.wait_for(a.claim(DIGEST), 10) == (Claim.ALONE, None)
            await a.aclose()

        asyncio.run(main())
