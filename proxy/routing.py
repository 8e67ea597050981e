"""Which upstream a request is for, and the repository name to ask it for.

In order: containerd's `?ns=<registry host>`; a path prefix naming an upstream
(`/v2/ghcr.io/<repo>/...`, as podman and skopeo mirrors are written); else the default
upstream (the Docker daemon's `registry-mirrors`). A registry that is not configured is
refused before any connection is made: the mirror must not reach arbitrary hosts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy import errors
from proxy.config import DOCKER_HUB_ALIASES, effective_prefix
from proxy.upstream import Upstream

# The OCI distribution-spec repository name grammar (fullmatch: `$` would admit a final "\n").
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    repo: str  # as the upstream knows it, e.g. "library/alpine"
    prefix: str  # what the client put before `repo`'s counterpart, e.g. "ghcr.io/" or ""


def valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None


def _looks_like_registry(component: str) -> bool:
    """`ghcr.io`, `localhost`: a first path component that names a host, not a namespace."""
    return "." in component or component == "localhost"


class Router:
    def __init__(self, upstreams: list[Upstream]) -> None:
        self._by_name: dict[str, Upstream] = {}
        self._by_prefix: dict[str, Upstream] = {}
        self.default: Upstream | None = None
        for upstream in upstreams:
            names = DOCKER_HUB_ALIASES if upstream.config.is_docker_hub else {upstream.name}
            for name in names:
                self._by_name[name] = upstream
            prefix = effective_prefix(upstream.config)
            if prefix is not None:
                self._by_prefix[prefix] = upstream
            if upstream.config.default:
                self.default = upstream

    def route(self, name: str, ns: str | None) -> Route:
        if not valid_name(name):
            raise errors.name_invalid(name)
        if ns is not None:
            upstream = self._by_name.get(ns.lower())
            if upstream is None:
                raise errors.name_unknown(name, f"no upstream is configured for registry {ns!r}")
            return Route(upstream, self._normalise(upstream, name), "")
        first, slash, rest = name.partition("/")
        if slash and first in self._by_prefix:
            upstream = self._by_prefix[first]
            return Route(upstream, self._normalise(upstream, rest), first + "/")
        if slash and _looks_like_registry(first):
            raise errors.name_unknown(name, f"no upstream is configured for registry {first!r}")
        if self.default is None:
            raise errors.name_unknown(name, "no default upstream is configured; name one with ?ns= or a prefix")
        return Route(self.default, self._normalise(self.default, name), "")

    @staticmethod
    def _normalise(upstream: Upstream, repo: str) -> str:
        if upstream.config.is_docker_hub and "/" not in repo:
            return f"library/{repo}"
        return repo

    def client_name(self, upstream_name: str, repo: str) -> str:
        """How a client of this mirror names `repo` of that upstream (for `_catalog`)."""
        upstream = self._by_name.get(upstream_name)
        if upstream is None or upstream is self.default:
            return repo
        prefix = effective_prefix(upstream.config)
        return f"{prefix}/{repo}" if prefix else repo

    def upstreams(self) -> list[Upstream]:
        return list({id(u): u for u in self._by_name.values()}.values())
