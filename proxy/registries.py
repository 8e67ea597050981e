"""Registry names: Docker Hub under its aliases, and the path prefix that names an upstream.

Imports nothing else from `proxy`, so the configuration and the routing can both use it.
"""

from __future__ import annotations

import re
from typing import Protocol

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# One component of an OCI distribution-spec repository name.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")  # fullmatch: `$` admits a final "\n"


class Named(Protocol):
    """What names an upstream (an `UpstreamConfig`)."""

    @property
    def name(self) -> str: ...

    @property
    def prefix(self) -> str | None: ...


def is_docker_hub(name: str) -> bool:
    return name in DOCKER_HUB_ALIASES


def is_component(text: str) -> bool:
    """Whether `text` can be one repository path component, e.g. `internal`."""
    return _COMPONENT.fullmatch(text) is not None


def effective_prefix(upstream: Named) -> str | None:
    """The path prefix that names this upstream: `prefix`, else its name when that can be one."""
    if upstream.prefix is not None:
        return upstream.prefix
    return upstream.name if is_component(upstream.name) else None
