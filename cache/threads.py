"""Blocking file work off the event loop, on a pool of its own.

Used on the paths that move blob bytes: one `run_in_executor` call costs a fraction of
anyio's `to_thread` (no cancel scope, capacity limiter or backend lookup per call), and
those paths make one call per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pullproxy-io")


async def run(function: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_POOL, function, *args)
