"""End-to-end tests with real clients (skopeo, containerd's ctr, podman): the slowest of the suite.

`scripts/test.sh -m "not slow"` skips them locally; CI always runs them.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.slow)
