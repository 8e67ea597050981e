"""Which upstream a request is for, and the repository name to ask it for.

In order: containerd's `?ns=<registry host>`; a path prefix naming an upstream
(`/v2/ghcr.io/<repo>/...`, as podman and skopeo mirrors are written); else the default
upstream (the Docker daemon's `registry-mirrors`). A registry that is not configured is
refused before any connection is made: the mirror must not reach arbitrary hosts.
Routing only says where: it holds configurations, never clients (see `proxy.upstream.pool`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxy import errors
from proxy.access.policy import full_name
from proxy.config import UpstreamConfig
from proxy.references import DEFAULT_TAG, ImageRef
from proxy.registries import DOCKER_HUB_ALIASES, effective_prefix

# The OCI distribution-spec repository name grammar (fullmatch: `$` would admit a final "\n").
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Route:
    upstream: UpstreamConfig
    repo: str  # as the upstream knows it, e.g. "library/alpine"
    prefix: str  # what the client put before `repo`'s counterpart, e.g. "ghcr.io/" or ""


def route_name(route: Route) -> str:
    """The full name access rules match, e.g. `docker.io/library/alpine`."""
    return full_name(route.upstream.name, route.repo)


def canonical(route: Route, ref: ImageRef) -> str:
    """The full name this mirror stores a reference under, e.g. `docker.io/library/alpine:latest`."""
    name = f"{route.upstream.name}/{route.repo}"
    if ref.digest and not ref.tag:
        return f"{name}@{ref.digest}"
    return f"{name}:{ref.tag or DEFAULT_TAG}"


def valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None


def _looks_like_registry(component: str) -> bool:
    """`ghcr.io`, `localhost`: a first path component that names a host, not a namespace."""
    return "." in component or component == "localhost"


class Router:
    def __init__(self, upstreams: Sequence[UpstreamConfig]) -> None:
        self._by_name: dict[str, UpstreamConfig] = {}
        self._by_prefix: dict[str, UpstreamConfig] = {}
        self.default: UpstreamConfig | None = None
        for upstream in upstreams:
            names = DOCKER_HUB_ALIASES if upstream.is_docker_hub else {upstream.name}
            for name in names:
                self._by_name[name] = upstream
            prefix = effective_prefix(upstream)
            if prefix is not None:
                self._by_prefix[prefix] = upstream
            if upstream.default:
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

    def resolve(self, ref: ImageRef) -> Route:
        """The route of an image reference (`proxy.references`); raises `errors.RegistryError` like a request."""
        if ref.registry is not None:
            return self.route(ref.repository, ref.registry)
        if self.default is None:
            return self.route(ref.repository, None)  # refuses with the same message as a request
        return self.route(ref.repository, self.default.name)

    @staticmethod
    def _normalise(upstream: UpstreamConfig, repo: str) -> str:
        if upstream.is_docker_hub and "/" not in repo:
            return f"library/{repo}"
        return repo

    def client_name(self, upstream_name: str, repo: str) -> str:
        """How a client of this mirror names `repo` of that upstream (for `_catalog`)."""
        upstream = self._by_name.get(upstream_name)
        if upstream is None or upstream is self.default:
            return repo
        prefix = effective_prefix(upstream)
        return f"{prefix}/{repo}" if prefix else repo
