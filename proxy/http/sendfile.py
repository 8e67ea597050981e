"""The ASGI `http.response.zerocopysend` extension on uvicorn's httptools protocol: file bytes go
to the socket with `os.sendfile`, never through Python buffers.

uvicorn implements no ASGI extension for it, and uvloop (which uvicorn picks) has no
`loop.sendfile`, so the extension is done here, on top of uvicorn's `RequestResponseCycle`:
`ZeroCopyCycle` handles the new message and hands every other one to uvicorn's `send`
unchanged. A protocol advertises it per request (`scope["extensions"][ZEROCOPY] = {}`) and
turns the request's cycle into a `ZeroCopyCycle` (a class swap, no copy). Only over plain TCP:
the kernel cannot encrypt, so a TLS connection keeps the plain path.

The message (ASGI spec, "Zero Copy Send"): `{"type": ZEROCOPY, "file": fd or file object,
"offset": int, "count": int, "more_body": bool}`; here `offset` and `count` are required, and
exactly `count` bytes are sent or the send raises (the file ended early, the client left):
the application then raises on, and uvicorn breaks the connection, so a client never sees a
clean end of a short body.

How: the transport's own write buffer is drained first (bytes keep their order), then
`os.sendfile` writes to a duplicate of the socket's descriptor — a transport's descriptor
cannot be watched by anyone else, a duplicate can — and waits for it to be writable when
the socket buffer is full. Nothing else writes to the transport meanwhile: the response is
this cycle's. Each call sends at most `STEP` bytes, and the loop is given a turn after each,
so one fast reader cannot hold the event loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

#: The ASGI extension's name, in `scope["extensions"]` and as the message type.
ZEROCOPY = "http.response.zerocopysend"
#: The most one sendfile call sends before the event loop gets a turn.
STEP = 4 << 20


class Waiting:
    """The socket-writable wait of a sendfile in progress, so that a lost connection ends it."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None

    def connection_lost(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_exception(ConnectionResetError("the connection was lost during sendfile"))


def _descriptor(file: Any) -> int:
    return file if isinstance(file, int) else int(file.fileno())


class ZeroCopyCycle(RequestResponseCycle):
    """uvicorn's request-response cycle of httptools, plus the zerocopysend message."""

    waiting: Waiting  # set by the protocol that swaps a cycle's class to this one

    async def send(self, message: Any) -> None:
        if message["type"] != ZEROCOPY:
            await RequestResponseCycle.send(self, message)
            return
        offset, count = int(message["offset"]), int(message["count"])
        if offset < 0 or count < 0:
            raise ValueError(f"{ZEROCOPY}: offset and count must not be negative")
        more_body = bool(message.get("more_body", False))
        if self.disconnected:
            return
        if not self.response_started:
            raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{ZEROCOPY}'.")
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{ZEROCOPY}' sent, after response already completed.")
        if count and self.scope["method"] != "HEAD":  # the transport is flushed before the file bytes go
            if self.chunked_encoding:
                self.transport.write(b"%x\r\n" % count)
            else:
                if count > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= count
            await self._sendfile(_descriptor(message["file"]), offset, count)
            if self.chunked_encoding:
                self.transport.write(b"\r\n")
        if not more_body:  # uvicorn's own end of a response (it waits for a paused transport): its checks, keep-alive
            await RequestResponseCycle.send(self, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        """Exactly `count` bytes of `fd` from `offset` to the socket, or raise."""
        socket = self.transport.get_extra_info("socket")
        if socket is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed or closing")
        await self._flushed()
        out = os.dup(socket.fileno())
        try:
            while count:
                if self.disconnected or self.transport.is_closing():
                    raise ConnectionResetError("the connection was closed during sendfile")
                try:
                    sent = os.sendfile(out, fd, offset, min(count, STEP))
                except (BlockingIOError, InterruptedError):
                    await self._writable(out)
                    continue
                if sent == 0:
                    raise EOFError(f"the file ended {count} bytes before the count given to {ZEROCOPY}")
                offset += sent
                count -= sent
                if sent == STEP:
                    await asyncio.sleep(0)  # a turn for the others
        finally:
            os.close(out)

    async def _flushed(self) -> None:
        """Until the transport has written out everything it holds (usually already so)."""
        transport = self.transport
        if not transport.get_write_buffer_size():
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0)  # and low = 0: resume_writing only once it is empty
        try:
            while transport.get_write_buffer_size() and not self.disconnected and not transport.is_closing():
                if self.flow.write_paused:
                    await self.flow.drain()
                else:  # not paused although not empty: a transport that does not pause at 0
                    await asyncio.sleep(0.001)
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def _writable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _wake, future)
        self.waiting.future = future
        try:
            await future
        finally:
            self.waiting.future = None
            loop.remove_writer(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
