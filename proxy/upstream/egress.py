"""Where requests for an upstream may go besides the upstream itself, and where credentials may.

An upstream names other hosts: a blob redirect's target, a token challenge's realm. Left
unchecked, an upstream could make the mirror request its own loopback services, the
cloud metadata address (169.254.169.254) or anything on its private network, or collect
the configured credentials over plain HTTP. So a named host may be on a loopback,
link-local or private address only if the upstream itself has an address of that kind
(a registry on 127.0.0.1 may redirect to a CDN on 127.0.0.1, one on the internet may not);
names are resolved with the event loop's `getaddrinfo` (in a thread), never blocking it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from enum import Enum

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVED_TTL = 60.0  # seconds the upstream's own addresses are remembered

_PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "fec0::/10")
)
_THIS_HOST = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.0.0.0 to the local host


class Reach(Enum):
    """Who an address belongs to, as far as a redirect or a realm may point at it."""

    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    PRIVATE = "private"
    PUBLIC = "public"


def reach_of(address: IPAddress) -> Reach:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified or address in _THIS_HOST:
        return Reach.LOOPBACK
    if address.is_link_local:
        return Reach.LINK_LOCAL
    if address.is_multicast or address.is_reserved:
        return Reach.PRIVATE  # never a public service: treat as internal
    if any(address.version == net.version and address in net for net in _PRIVATE):
        return Reach.PRIVATE
    return Reach.PUBLIC


async def addresses(host: str, port: int) -> frozenset[IPAddress]:
    """An IP literal as is, a name as the resolver answers it (OSError when it cannot)."""
    try:
        return frozenset({ipaddress.ip_address(host)})
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return frozenset(ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos)


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host.lower(), _port(a)) == (b.scheme, b.host.lower(), _port(b))


class Egress:
    """The reach of one upstream: which named hosts its requests may go to."""

    def __init__(self, upstream_url: str) -> None:
        self.url = httpx.URL(upstream_url)
        self._own: tuple[float, frozenset[IPAddress]] | None = None

    async def own_addresses(self) -> frozenset[IPAddress]:
        """The upstream's addresses, resolved at most every `RESOLVED_TTL` seconds; empty when unresolvable."""
        if self._own is not None and time.monotonic() - self._own[0] < RESOLVED_TTL:
            return self._own[1]
        try:
            found = await addresses(self.url.host, _port(self.url))
        except OSError:
            found = frozenset()
        self._own = (time.monotonic(), found)
        return found

    async def address_refusal(self, target: httpx.URL) -> str | None:
        """Why a request may not go to `target`'s host, or None when it may."""
        if target.scheme not in ("http", "https") or not target.host:
            return "not an http(s) URL with a host"
        try:
            found = await addresses(target.host, _port(target))
        except OSError as exc:
            return f"{target.host} does not resolve ({exc})"
        own = {reach_of(a) for a in await self.own_addresses()}
        for address in sorted(found, key=str):
            reach = reach_of(address)
            if reach is not Reach.PUBLIC and reach not in own:
                return f"{address} is a {reach.value} address, and the upstream is not on one"
        return None

    async def redirect_refusal(self, source: httpx.URL, target: httpx.URL) -> str | None:
        """Why a redirect from `source` to `target` may not be followed, or None when it may."""
        if source.scheme == "https" and target.scheme == "http":
            return "it leaves https for plain http"
        return await self.address_refusal(target)

    async def is_own_host(self, url: httpx.URL) -> bool:
        """Whether `url` names the upstream's host (by name, or by a shared address); any port."""
        if url.host.lower() == self.url.host.lower():
            return True
        try:
            theirs = await addresses(url.host, _port(url))
        except OSError:
            return False
        return bool(theirs & await self.own_addresses())

    async def may_get_credentials(self, url: httpx.URL) -> bool:
        """Credentials go over https, or in plain HTTP only to a plain-HTTP upstream's own host."""
        if url.scheme == "https":
            return True
        return self.url.scheme == "http" and url.scheme == "http" and await self.is_own_host(url)
