"""Blob GETs on a blocking transport, so that a download's own thread can read the body.

An `httpx.AsyncClient` reads every body on the event loop. For blobs that is most of the
work the mirror does, so the upstream client sends blob GETs through `ThreadedTransport`
instead: an async transport (everything before the body — auth, redirects, status checks,
backoff — stays the async client's) whose requests a blocking `httpx.HTTPTransport` sends
from a thread. The response's body is then a blocking stream too: `blocking_body` hands
it to whoever reads it blockingly (`cache.flight` does, on the download's thread); read
on the loop instead (a redirect's or an error's body, closed unread), each chunk costs a
thread hop. The blocking transport has its own connection pool, with the upstream's limits.

`body_chunks` reads a large body of declared length straight from its socket once the HTTP
parser (h11) has handed over the bytes it held: h11 copies every byte four times on its
way, which for a layer of hundreds of MiB is as much work as hashing it. Its connection is
closed afterwards (its parser never saw the body end), so smaller bodies keep the parser
and their keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpcore
import httpx

#: The response extension that holds the blocking body stream.
BLOCKING_BODY = "pullproxy.blocking_body"

# One blocking read takes what the socket holds, up to this much (httpcore's default is
# 64 KiB): fewer, larger reads for the thread that writes and hashes a blob.
READ_SIZE = 256 << 10
httpcore.HTTP11Connection.READ_NUM_BYTES = READ_SIZE
# Bodies from this size on are read from the socket (see above); a new connection (and, over
# TLS, a handshake) per blob is then nothing next to the transfer.
RAW_BODY_MIN = 16 << 20


class _LoopStream(httpx.AsyncByteStream):
    """A blocking body read from the loop, one thread hop per chunk (rarely: blob bodies go to
    `blocking_body`'s reader)."""

    def __init__(self, stream: httpx.SyncByteStream, executor: ThreadPoolExecutor) -> None:
        self.stream = stream
        self._executor = executor

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        chunks = iter(self.stream)
        while (chunk := await loop.run_in_executor(self._executor, next, chunks, None)) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.stream.close()  # quick: a connection is returned to the pool or closed, nothing read


class ThreadedTransport(httpx.AsyncBaseTransport):
    """Requests without a body, sent by a blocking transport in threads of `executor`."""

    def __init__(self, transport: httpx.HTTPTransport, executor: ThreadPoolExecutor) -> None:
        self._transport = transport
        self._executor = executor

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.SyncByteStream):
            raise TypeError("a threaded request cannot carry an asynchronous body")
        loop = asyncio.get_running_loop()
        sending = loop.run_in_executor(self._executor, self._transport.handle_request, request)
        try:
            response = await asyncio.shield(sending)
        except asyncio.CancelledError:
            sending.add_done_callback(_close_unread)  # the request goes on in its thread: close what it gets
            raise
        stream = response.stream
        assert isinstance(stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_LoopStream(stream, self._executor),
            extensions={**response.extensions, BLOCKING_BODY: stream},
        )

    async def aclose(self) -> None:
        self._transport.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _close_unread(sending: asyncio.Future[httpx.Response]) -> None:
    if sending.cancelled() or sending.exception() is not None:
        return
    with contextlib.suppress(Exception):
        sending.result().close()


def blocking_body(response: httpx.Response) -> httpx.SyncByteStream | None:
    """The body of a response that `ThreadedTransport` answered, to read blockingly (and close) in
    one thread, never on the loop; None for any other response (read it on the loop)."""
    stream: Any = response.extensions.get(BLOCKING_BODY)
    return stream if isinstance(stream, httpx.SyncByteStream) else None


def body_chunks(response: httpx.Response, stream: httpx.SyncByteStream, size: int | None) -> Iterator[bytes]:
    """Blocking: the raw body of `response` (from `ThreadedTransport`, `size` its Content-Length).

    From RAW_BODY_MIN bytes on, and over a socket of its own (plain, or TLS ended by this
    process: not a tunnel), what h11 holds is taken with one step of `stream` (h11 hands over
    all it has buffered, or reads once), then the rest straight from the socket, with the
    read timeout httpcore set on it. Short bodies raise as httpx does; close `stream` after.
    """
    connection = _socket_of(response) if size is not None and size >= RAW_BODY_MIN else None
    if connection is None or size is None:
        yield from stream
        return
    parsed = iter(stream)  # kept until the end: dropping it would close the connection
    first = next(parsed, b"")
    received = len(first)
    if first:
        yield first
    while received < size:
        try:
            chunk = connection.recv(min(READ_SIZE, size - received))
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"reading the body timed out ({exc})") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the body failed ({exc})") from exc
        if not chunk:
            raise httpx.RemoteProtocolError(f"peer closed connection after {received} of {size} body bytes")
        received += len(chunk)
        yield chunk


def _socket_of(response: httpx.Response) -> socket.socket | None:
    """The socket the body arrives on, when reading it gives the body's bytes (not a TLS tunnel's)."""
    if response.headers.get("Transfer-Encoding") or response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    stream: Any = response.extensions.get("network_stream")
    if stream is None or response.extensions.get("http_version", b"HTTP/1.1") != b"HTTP/1.1":
        return None
    connection = stream.get_extra_info("socket")
    if not isinstance(connection, socket.socket):
        return None
    if stream.get_extra_info("ssl_object") is not None and not isinstance(connection, ssl.SSLSocket):
        return None  # TLS in TLS: the socket carries the outer layer
    return connection
