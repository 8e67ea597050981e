"""Slowing down password guessing: failed logins counted per client address.

After `free` failures within `window` seconds, each further password check from that
address waits first, twice as long each time up to `max_delay`. Counts live in a
bounded TTL cache, so a flood of addresses costs bounded memory (the oldest are
forgotten first).
"""

from __future__ import annotations

import asyncio

from cachetools import TTLCache


class LoginThrottle:
    def __init__(self, free: int = 5, window: float = 600.0, first_delay: float = 0.5, max_delay: float = 10.0) -> None:
        self.free = free
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.total_failures = 0
        self._failures: TTLCache[str, int] = TTLCache(maxsize=10_000, ttl=window)

    def delay(self, client: str) -> float:
        excess = self._failures.get(client, 0) - self.free
        return 0.0 if excess < 0 else min(self.first_delay * 2**excess, self.max_delay)

    async def wait(self, client: str) -> None:
        delay = self.delay(client)
        if delay:
            await asyncio.sleep(delay)

    def failed(self, client: str) -> int:
        """Count a failure; returns how many this address has had in the window."""
        self.total_failures += 1
        count = self._failures.get(client, 0) + 1
        self._failures[client] = count
        return count
