"""Blob GETs on a blocking transport, so that a download's own thread can read the body.

An `httpx.AsyncClient` reads every body on the event loop. For blobs that is most of the
work the mirror does, so the upstream client sends blob GETs through `ThreadedTransport`
instead: an async transport (everything before the body — auth, redirects, status checks,
backoff — stays the async client's) whose requests a blocking `httpx.HTTPTransport` sends
from a thread. The response's body is then a blocking stream too: `blocking_body` hands
it to whoever reads it blockingly (`cache.flight` does, on the download's thread); read
on the loop instead (a redirect's or an error's body, closed unread), each chunk costs a
thread hop. The blocking transport has its own connection pool, with the upstream's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpcore
import httpx

#: The response extension that holds the blocking body stream.
BLOCKING_BODY = "pullproxy.blocking_body"

# One blocking read takes what the socket holds, up to this much (httpcore's default is
# 64 KiB): fewer, larger reads for the thread that writes and hashes a blob.
httpcore.HTTP11Connection.READ_NUM_BYTES = 256 << 10


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
