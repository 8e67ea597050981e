"""The upstream clients of one process, by upstream name: how to reach where routing points."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import httpx

from proxy.config import UpstreamConfig
from proxy.routing import Route
from proxy.upstream.client import Upstream


class Upstreams:
    """One client (connection pool, credentials, health) per configured upstream."""

    def __init__(
        self,
        configs: Sequence[UpstreamConfig],
        offline: bool = False,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        transports = transports or {}
        self._clients = {
            config.name: Upstream(config, transport=transports.get(config.name), offline=offline) for config in configs
        }

    def of(self, route: Route) -> Upstream:
        return self._clients[route.upstream.name]

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._clients.values())

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
