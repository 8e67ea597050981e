"""Single flight: concurrent callers asking for the same thing share one piece of work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """The work for a key runs once for everyone waiting on it; a caller that leaves does not cancel it."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[T]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> T:
        flight = self._running.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._running[key] = flight
            flight.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(flight)

    def __len__(self) -> int:
        return len(self._running)
