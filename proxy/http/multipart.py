"""A 206 answer streamed range by range: one range as itself, several as `multipart/byteranges`.

Each range's bytes come from a callable (the cache's file, a download in flight, or an
upstream range request; see `mirror.blobs.Blobs.span`), one chunk at a time, so a response
holds no more than one chunk whatever it spans. The framing is RFC 9110 §14.6 (Go's
`net/http` writes the same), and the Content-Length is exact: a part that comes short
breaks the connection, so the client sees a short body, never a clean wrong end.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cache.readers import BlobReader
from proxy import errors
from proxy.http.ranges import Refusal, Span, parse_ranges
from proxy.http.responses import BlobResponse

PART_TYPE = "application/octet-stream"

SpanSource = Callable[[int, int], AsyncGenerator[bytes, None]]  # (first, last inclusive) -> its bytes, in order


class ShortRange(Exception):
    """A range's source ended before (or went past) the range's end."""


def _part_head(boundary: str, span: Span, size: int, first: bool) -> bytes:
    lead = "" if first else "\r\n"
    return (
        f"{lead}--{boundary}\r\nContent-Type: {PART_TYPE}\r\nContent-Range: bytes {span[0]}-{span[1]}/{size}\r\n\r\n"
    ).encode("ascii")


class RangesResponse(Response):
    def __init__(
        self,
        spans: list[Span],
        size: int,
        source: SpanSource,
        headers: dict[str, str],
        close: Callable[[], Awaitable[None]],
        send_body: bool = True,
    ) -> None:
        self.spans = spans
        self.size = size
        self.source = source
        self.close = close
        self.send_body = send_body
        self.status_code = 206
        self.background = None
        self.boundary = secrets.token_hex(16)
        if len(spans) == 1:
            (start, end), length = spans[0], spans[0][1] - spans[0][0] + 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        else:
            headers["Content-Type"] = f"multipart/byteranges; boundary={self.boundary}"
            length = sum(
                len(_part_head(self.boundary, span, size, i == 0)) + span[1] - span[0] + 1
                for i, span in enumerate(spans)
            ) + len(self._tail())
        headers["Content-Length"] = str(length)
        self.init_headers(headers)

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode("ascii")

    async def _send_span(self, span: Span, send: Send) -> None:
        expected = span[1] - span[0] + 1
        sent = 0
        chunks = self.source(*span)
        try:
            async for chunk in chunks:
                sent += len(chunk)
                if sent > expected:
                    raise ShortRange(f"range {span[0]}-{span[1]} got {sent} bytes, more than asked")
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()
        if sent != expected:
            raise ShortRange(f"range {span[0]}-{span[1]} ended after {sent} of {expected} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if self.send_body:
                multipart = len(self.spans) > 1
                for i, span in enumerate(self.spans):
                    if multipart:
                        head = _part_head(self.boundary, span, self.size, i == 0)
                        await send({"type": "http.response.body", "body": head, "more_body": True})
                    await self._send_span(span, send)
                if multipart:
                    await send({"type": "http.response.body", "body": self._tail(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.close()


def file_answer(reader: BlobReader, size: int, headers: dict[str, str], header: str | None) -> Response:
    """The answer for a blob whose bytes are all at hand (a verified file): whole, one range, or several."""
    spans = parse_ranges(header, size)
    if spans is Refusal.UNSATISFIABLE:
        reader.close()
        raise errors.RangeUnsatisfiable(size)
    if spans is None:
        return BlobResponse(reader, size, headers)
    assert isinstance(spans, list)
    if len(spans) == 1:
        return BlobResponse(reader, size, headers, spans[0])

    async def source(start: int, end: int) -> AsyncGenerator[bytes, None]:
        offset = start
        while offset <= end:
            chunk = await reader.read(offset, end - offset + 1)
            if not chunk:
                raise ShortRange(f"the file ended at {offset}, before byte {end}")
            offset += len(chunk)
            yield chunk

    async def close() -> None:
        reader.close()

    return RangesResponse(spans, size, source, headers, close)
