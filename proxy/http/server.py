"""Connection handling: uvicorn's HTTP protocol, bounded in what one client can hold.

uvicorn limits neither the size of a request head (httptools has no limit at all) nor the time
a new connection may take to send one, and accepts connections until the process runs out of
file descriptors; a few hundred silent sockets then lock everyone out. `serve_options` hands
uvicorn a protocol that keeps, in each worker process:

- every request head within `max_header_size` (else 431 and close) and `header_timeout`,
  counted from the connection's start or from the first byte of a keep-alive request (else close);
- at most `max_connections` connections, and `max_connections_per_client` from one address
  (an IPv6 /64), so a flood from one address leaves room for everyone else. A connection over a
  limit gets `429 TOOMANYREQUESTS` (its address holds too many) or `503 UNAVAILABLE` (the server
  does) with `Retry-After` once its request head is in; beyond `REFUSING` such answers at a
  time, further ones are closed at once. Trusted proxies are not limited per address: every
  client behind one shares it.

It stays uvicorn's own protocol class (httptools, h11 when httptools is missing), so serving
keeps their speed: the checks per request are a few attribute updates and one sum. Over plain
TCP, httptools' protocol also offers each request the ASGI zero-copy send (`http.sendfile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import math
import resource
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import structlog
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from proxy import config as configuration
from proxy import errors, tls
from proxy.access.policy import Network
from proxy.http.edge import error_response, status_of
from proxy.http.sendfile import ZEROCOPY, Waiting, ZeroCopyCycle

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = structlog.get_logger("pullproxy")

#: Connections over a limit that are being answered at once; beyond, they are closed unanswered.
REFUSING = 32
#: How long a connection over a limit may take to send the request head its refusal answers.
REFUSAL_TIMEOUT = 1.0
#: After a 431, how long incoming bytes are read and dropped so the client can read the answer.
LINGER = 2.0
#: File descriptors kept apart from client connections: cache files, SQLite, logs, threads.
FD_RESERVE = 256
#: File descriptors a client connection may take: its socket and a cached blob it is sent.
FDS_PER_CONNECTION = 2
#: At most one log line per this many seconds about connections refused or closed.
LOG_INTERVAL = 10.0


class Closed(enum.Enum):
    """Why a connection was refused or closed by the limits."""

    CLIENT_LIMIT = "client_limit"  # its address held max_connections_per_client: 429
    SERVER_LIMIT = "server_limit"  # the process held max_connections: 503
    DROPPED = "dropped"  # over a limit while REFUSING others were being answered: closed at once
    HEADER_TIMEOUT = "header_timeout"  # no complete request head within header_timeout: closed
    HEADER_TOO_LARGE = "header_too_large"  # request head over max_header_size: 431


@dataclass(frozen=True)
class Limits:
    """What one worker process enforces (the configured totals divided among workers)."""

    max_header_size: int
    header_timeout: float
    max_connections: int
    max_connections_per_client: int
    unlimited: tuple[Network, ...] = ()  # trusted proxies: no per-address limit


def client_key(host: str) -> str:
    """What the per-client limit counts: the IPv4 address, or the /64 of an IPv6 one."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def _raw_response(error: errors.RegistryError) -> bytes:
    """An OCI error as bytes on the wire, for answers given before a request reaches the app."""
    body = json.dumps({"errors": [{"code": str(error.code), "message": error.message, "detail": None}]}).encode()
    status = status_of(error)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "docker-distribution-api-version: registry/2.0\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def _closing(error: errors.RegistryError) -> Response:
    response = error_response(error)
    response.headers["Connection"] = "close"
    return response


class Connections:
    """The open connections of one process, by client; and a summary log of refusals."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.refusing = 0
        per_client = limits.max_connections_per_client
        self.refusals: dict[Closed, Any] = {
            Closed.CLIENT_LIMIT: _closing(
                errors.TooManyRequests(f"too many connections from your address (at most {per_client})", "1")
            ),
            Closed.SERVER_LIMIT: _closing(
                errors.Unavailable("the mirror has too many open connections, retry shortly", "1")
            ),
        }
        size = f"{limits.max_header_size // 1024} KiB"
        self.too_large = _raw_response(errors.HeadersTooLarge(f"request header fields are larger than {size}"))
        self._closed: Counter[Closed] = Counter()
        self._logged_at = -math.inf
        self._flush: asyncio.TimerHandle | None = None

    def admit(self, key: str | None) -> Closed | None:
        """Count a new connection in, or say which limit it is over (then it is not counted)."""
        if key is not None and self.by_client.get(key, 0) >= self.limits.max_connections_per_client:
            return Closed.CLIENT_LIMIT
        if self.open >= self.limits.max_connections:
            return Closed.SERVER_LIMIT
        self.open += 1
        if key is not None:
            self.by_client[key] = self.by_client.get(key, 0) + 1
        return None

    def release(self, key: str | None) -> None:
        self.open -= 1
        if key is not None:
            left = self.by_client[key] - 1
            if left:
                self.by_client[key] = left
            else:
                del self.by_client[key]

    def key(self, client: tuple[str, int] | None) -> str | None:
        """The per-client key of a peer; None for a trusted proxy or a Unix socket (no per-client limit)."""
        if client is None:
            return None
        if self.limits.unlimited:
            try:
                address = ipaddress.ip_address(client[0])
            except ValueError:
                return client[0]
            if any(address in network for network in self.limits.unlimited):
                return None
        return client_key(client[0])

    def note(self, closed: Closed, loop: asyncio.AbstractEventLoop) -> None:
        """Count a refusal; a flood makes one log line per LOG_INTERVAL, not one per socket."""
        self._closed[closed] += 1
        if self._flush is not None:
            return
        wait = self._logged_at + LOG_INTERVAL - loop.time()
        if wait <= 0:
            self._log(loop)
        else:
            self._flush = loop.call_later(wait, self._log, loop)

    def _log(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush = None
        self._logged_at = loop.time()
        counts = {closed.value: n for closed, n in self._closed.items()}
        self._closed.clear()
        log.warning("connections refused or closed by the limits", open=self.open, **counts)


class Protocols:
    """What uvicorn gets as `http=`: makes each connection's protocol, counting them.

    An instance, not a class, so that it can carry this server's limits; it is pickled to
    worker processes along with uvicorn's config, and each then counts its own connections.
    """

    def __init__(self, limits: Limits, protocol: Callable[..., asyncio.Protocol] | None = None) -> None:
        self.protocol: Callable[..., asyncio.Protocol]
        self.limits = limits
        self.connections = Connections(limits)
        self.protocol = protocol or PROTOCOL

    def __call__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Protocol:
        return self.protocol(config, server_state, app_state, _loop, connections=self.connections)


class _State:
    """One connection's part in the limits.

    Kept in one slotted object: uvicorn's protocol already has 28 attributes, and past 30 its
    instances lose CPython's shared-key dicts, which slows every attribute access it makes.
    `head_started` is the loop time at which the request head now being read began (None: none
    is); one timer per connection checks it, re-armed only while heads keep coming, so a busy
    keep-alive connection does not create a timer per request. `in_head`: the bytes now
    arriving belong to a request head, counted in `head_bytes`.
    """

    __slots__ = (
        "admitted",
        "connections",
        "head_bytes",
        "head_started",
        "head_timeout",
        "in_head",
        "key",
        "limits",
        "lingering",
        "refusing",
        "timer",
        "waiting",
    )

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self.limits = connections.limits
        self.key: str | None = None
        self.admitted = False
        self.refusing = False
        self.timer: asyncio.TimerHandle | None = None
        self.head_started: float | None = None
        self.head_timeout = connections.limits.header_timeout
        self.in_head = True
        self.head_bytes = 0
        self.lingering = False
        self.waiting = Waiting()  # a sendfile waiting for the socket (httptools' protocol)


class _Bounded:
    """The limits, on top of one of uvicorn's HTTP/1.1 protocols (which provide the attributes below)."""

    transport: asyncio.Transport
    client: tuple[str, int] | None
    loop: asyncio.AbstractEventLoop
    app: Any
    _bounds: _State

    def _admit(self) -> None:
        """On a new connection: count it in and time its first head, or refuse it."""
        bounds = self._bounds
        connections = bounds.connections
        bounds.key = connections.key(self.client)
        refusal = connections.admit(bounds.key)
        if refusal is None:
            bounds.admitted = True
        elif connections.refusing >= REFUSING:
            connections.note(Closed.DROPPED, self.loop)
            self.transport.close()
            return
        else:
            connections.note(refusal, self.loop)
            connections.refusing += 1
            bounds.refusing = True
            self.app = connections.refusals[refusal]  # answers the request head, then closes
            bounds.head_timeout = min(bounds.head_timeout, REFUSAL_TIMEOUT)
        self._head_begins()

    def _release(self) -> None:
        bounds = self._bounds
        if bounds.timer is not None:
            bounds.timer.cancel()
            bounds.timer = None
        if bounds.admitted:
            bounds.admitted = False
            bounds.connections.release(bounds.key)
        elif bounds.refusing:
            bounds.refusing = False
            bounds.connections.refusing -= 1

    def _head_begins(self) -> None:
        bounds = self._bounds
        bounds.head_started = self.loop.time()
        if bounds.timer is None:
            bounds.timer = self.loop.call_later(bounds.head_timeout, self._check_head)

    def _check_head(self) -> None:
        bounds = self._bounds
        bounds.timer = None
        if bounds.head_started is None or self.transport.is_closing():
            return
        left = bounds.head_started + bounds.head_timeout - self.loop.time()
        if left > 0:  # a later head than the one that armed the timer
            bounds.timer = self.loop.call_later(left, self._check_head)
            return
        bounds.connections.note(Closed.HEADER_TIMEOUT, self.loop)
        self.transport.close()


if HttpToolsProtocol is not None:

    class BoundedHttpToolsProtocol(_Bounded, HttpToolsProtocol):
        """httptools' protocol with the limits; the head size is checked as bytes arrive, so a
        head that never ends cannot grow past the limit by more than one read.

        The base class is called directly, not through super(): these methods run for every request.
        """

        def __init__(
            self,
            config: Any,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
            *,
            connections: Connections,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._bounds = _State(connections)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._admit()

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            self._bounds.waiting.connection_lost()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            bounds = self._bounds
            if bounds.lingering:
                return
            if bounds.in_head:
                bounds.head_bytes += len(data)
                if bounds.head_started is None:  # a keep-alive request: timed from its first byte
                    self._head_begins()
            HttpToolsProtocol.data_received(self, data)
            if bounds.in_head and bounds.head_bytes > bounds.limits.max_header_size and not self.transport.is_closing():
                self._too_large()

        def on_headers_complete(self) -> None:
            bounds = self._bounds
            if bounds.lingering:
                return
            bounds.head_started = None
            bounds.in_head = False
            size = len(self.url)
            for name, value in self.headers:
                size += len(name) + len(value) + 4
            if size > bounds.limits.max_header_size:
                self._too_large()
                return
            previous = self.cycle
            HttpToolsProtocol.on_headers_complete(self)
            cycle = self.cycle
            if cycle is not previous and self.scheme == "http":  # a request's cycle, not TLS: zero-copy
                cycle.__class__ = ZeroCopyCycle
                cycle.waiting = bounds.waiting  # type: ignore[attr-defined]
                self.scope["extensions"] = {ZEROCOPY: {}}

        def on_body(self, body: bytes) -> None:
            if not self._bounds.lingering:
                HttpToolsProtocol.on_body(self, body)

        def on_message_complete(self) -> None:
            bounds = self._bounds
            if bounds.lingering:
                return
            HttpToolsProtocol.on_message_complete(self)
            bounds.in_head = True
            bounds.head_bytes = 0

        def _too_large(self) -> None:
            """431, then read and drop what the client still sends for LINGER, so it sees the answer."""
            bounds = self._bounds
            bounds.lingering = True
            bounds.head_started = None
            bounds.connections.note(Closed.HEADER_TOO_LARGE, self.loop)
            self.transport.write(bounds.connections.too_large)
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER, self.transport.close)
            else:
                self.transport.close()


class BoundedH11Protocol(_Bounded, H11Protocol):
    """h11's protocol with the limits, for where httptools is missing.

    h11 itself bounds a head that has not ended (`h11_max_incomplete_event_size`, set to
    `max_header_size`; uvicorn answers 400), though a whole head in one read passes; a head is
    being read while h11 waits in state IDLE.
    """

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        connections: Connections,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._bounds = _State(connections)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        bounds = self._bounds
        if bounds.head_started is None and self.conn.their_state is h11.IDLE:
            self._head_begins()
        H11Protocol.data_received(self, data)
        if self.conn.their_state is not h11.IDLE:
            bounds.head_started = None


#: The protocol of every connection: httptools' (uvicorn's default, and faster), else h11's.
PROTOCOL: type[asyncio.Protocol] = BoundedH11Protocol
if HttpToolsProtocol is not None:
    PROTOCOL = BoundedHttpToolsProtocol


class BoundedTLSProtocol(tls.PeerCertificate, PROTOCOL):  # type: ignore[misc,valid-type]
    """Over TLS: the limits, and each request told its connection's client certificate (see `tls`)."""


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one (often 1024 of 524288); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        with contextlib.suppress(ValueError, OSError):  # e.g. macOS above OPEN_MAX: keep what there is
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def worker_limits(config: configuration.Config, workers: int, open_files: int) -> Limits:
    """Each worker's share of the limits, kept below what `open_files` descriptors can serve."""
    total = math.ceil(config.max_connections / workers)
    per_client = math.ceil(config.max_connections_per_client / workers)
    reserve = min(FD_RESERVE + REFUSING + sum(u.max_connections for u in config.upstreams), open_files // 2)
    fits = max(1, (open_files - reserve) // FDS_PER_CONNECTION)
    if total > fits:
        log.warning(
            "server.max_connections lowered: the open-file limit is too low for it",
            max_connections=config.max_connections,
            per_worker=fits,
            open_file_limit=open_files,
            hint="raise it (ulimit -n, systemd LimitNOFILE=, docker --ulimit nofile=)",
        )
        per_client = max(1, per_client * fits // total)
        total = fits
    return Limits(
        max_header_size=config.max_header_size,
        header_timeout=config.header_timeout,
        max_connections=total,
        max_connections_per_client=per_client,
        unlimited=config.trusted_proxies,
    )


def serve_options(config: configuration.Config, workers: int) -> dict[str, Any]:
    """uvicorn.run() options that bound connections; raises this process's open-file limit first."""
    limits = worker_limits(config, workers, raise_open_files_limit())
    protocol = BoundedTLSProtocol if config.tls_cert is not None else PROTOCOL
    return {"http": Protocols(limits, protocol), "h11_max_incomplete_event_size": limits.max_header_size}
