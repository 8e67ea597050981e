"""Shared fixtures: one seeded upstream registry per session, factories for the rest.

The seeded registry is the expensive part (a 256 MiB layer), so it is built
once and treated as read-only; tests that need to mutate an upstream make
their own with ``registry_factory``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from tests.support.clients import Containerd
from tests.support.images import PushedImage, seed_all
from tests.support.proxy import Proxy
from tests.support.redis_server import RedisServer
from tests.support.registry import Registry
from tests.support.seaweed import SeaweedFS

#: Per-test wall-clock cap (seconds) when pytest-timeout is not active; every
#: subprocess and HTTP call has its own, shorter timeout as the first line of defence.
TEST_TIMEOUT = float(os.environ.get("PULLPROXY_TEST_TIMEOUT", "600"))
#: Size of the big layer in the seeded upstream (``acme/big``).
BIG_SIZE = int(os.environ.get("PULLPROXY_TEST_BIG_SIZE", str(256 << 20)))


class SeededRegistry(Registry):
    """A plain Registry plus ``images``: the :func:`seed_all` description."""

    images: dict[str, PushedImage]


@pytest.fixture(autouse=True)
def _bounded_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIMEOUT instead of hanging CI.

    Uses SIGALRM in the main thread; steps aside when pytest-timeout is loaded
    (it would own SIGALRM) or when not on the main thread.
    """
    if request.config.pluginmanager.hasplugin("timeout") or TEST_TIMEOUT <= 0:
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT:.0f}s (PULLPROXY_TEST_TIMEOUT)")

    try:
        previous = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def upstream() -> Iterator[SeededRegistry]:
    """Plain distribution registry seeded once with the standard corpus (read-only).

    Its storage lives in its own temp dir, deleted at session end (not under
    pytest's tmp_path, which keeps the last runs' files around).
    """
    reg = SeededRegistry()
    try:
        reg.images = seed_all(reg.url, reg.dir, big_size=BIG_SIZE)
        yield reg
    finally:
        reg.close()


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., Registry]]:
    """Make extra registries (``Registry(**kwargs)``); all are closed and deleted after the test."""
    made: list[Registry] = []

    def make(**kwargs: Any) -> Registry:
        reg = Registry(**kwargs)
        made.append(reg)
        return reg

    try:
        yield make
    finally:
        for reg in made:
            reg.close()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., Proxy]]:
    """Make mirrors (``Proxy(config, upstream_url=..., args=..., env=...)``); closed and deleted after."""
    made: list[Proxy] = []

    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> Proxy:
        proxy = Proxy(config, **kwargs)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """A fresh private containerd (empty content store) for one test."""
    with Containerd() as ctd:
        yield ctd


# The fleet's servers, one of each per test module (a module that stops them defines its own).
@pytest.fixture(scope="module")
def weed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
