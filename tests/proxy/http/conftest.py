"""One fault-injecting upstream and one mirror of it per test module of the HTTP layer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyRegistry]:
    with FaultyRegistry(tags_page_size=None) as registry:
        yield registry


@pytest.fixture(scope="module")
def proxy(faulty: FaultyRegistry) -> Iterator[Proxy]:
    with Proxy(upstream_url=faulty.url) as running:
        yield running
