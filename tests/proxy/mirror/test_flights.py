"""proxy.mirror.flights and proxy.mirror.outcome, in-process."""

from __future__ import annotations

import asyncio

import pytest

from proxy.mirror.flights import SingleFlight
from proxy.mirror.outcome import Outcome


def test_concurrent_callers_with_one_key_share_one_run() -> None:
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return runs

    async def main() -> list[int]:
        flight: SingleFlight[str, int] = SingleFlight()
        results = await asyncio.gather(*(flight.run("k", work) for _ in range(10)))
        assert len(flight) == 0  # forgotten once done
        return results

    assert asyncio.run(main()) == [1] * 10
    assert runs == 1


def test_other_keys_and_later_calls_run_again() -> None:
    calls: list[str] = []

    async def main() -> None:
        flight: SingleFlight[str, str] = SingleFlight()

        def work(key: str):  # type: ignore[no-untyped-def]
            async def run() -> str:
                calls.append(key)
                return key

            return run

        assert await asyncio.gather(flight.run("a", work("a")), flight.run("b", work("b"))) == ["a", "b"]
        await asyncio.sleep(0)
        assert await flight.run("a", work("a")) == "a"

    asyncio.run(main())
    assert calls == ["a", "b", "a"]


def test_a_failure_reaches_every_caller_and_a_leaving_caller_does_not_cancel_the_work() -> None:
    async def main() -> None:
        flight: SingleFlight[str, int] = SingleFlight()
        release = asyncio.Event()
        finished = asyncio.Event()

        async def slow() -> int:
            await release.wait()
            finished.set()
            return 7

        leaving = asyncio.create_task(flight.run("k", slow))
        staying = asyncio.create_task(flight.run("k", slow))
        await asyncio.sleep(0.01)
        leaving.cancel()
        release.set()
        assert await staying == 7
        assert finished.is_set()

        async def broken() -> int:
            raise ValueError("upstream said no")

        results = await asyncio.gather(*(flight.run("x", broken) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("outcome", "from_cache"),
    [
        (Outcome.HIT, True),
        (Outcome.REVALIDATED, True),
        (Outcome.STALE, True),
        (Outcome.MISS, False),
        (Outcome.JOINED, False),
    ],
)
def test_outcomes_served_from_the_cache(outcome: Outcome, from_cache: bool) -> None:
    assert outcome.from_cache is from_cache
    assert str(outcome) == outcome.value  # log lines and metric labels keep today's spelling
