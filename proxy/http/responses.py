"""Streaming a blob to a client from any `BlobReader`, with single-range support.

One response class serves a cached file and a download in flight alike. If the reader
fails midway the exception propagates, and the server breaks the connection: with a
Content-Length announced, the client sees a short body, never a clean wrong end.

When the server offers the ASGI zero-copy send (`http.sendfile`) and the reader's bytes are
in a file (`FileExtents`: a cached blob, or the written part of a download in flight), the
bytes go from the file to the socket with `os.sendfile`; otherwise they are read and sent.
"""

from __future__ import annotations

from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cache.readers import BlobReader, FileExtents
from proxy.http.edge import API_VERSION
from proxy.http.sendfile import ZEROCOPY

_UNBOUNDED = 1 << 62  # readers return what they have at hand, up to their own chunk size


class AnyManifest(Protocol):
    """A cached (`cache.storage.Manifest`) or hosted manifest."""

    @property
    def digest(self) -> str: ...
    @property
    def media_type(self) -> str: ...
    @property
    def body(self) -> bytes: ...


def manifest_response(manifest: AnyManifest, head: bool) -> Response:
    """A manifest as registries answer it, for GET and HEAD alike (containerd needs the headers on HEAD)."""
    headers = {
        **API_VERSION,
        "Docker-Content-Digest": manifest.digest,
        "Content-Length": str(len(manifest.body)),
        "Content-Type": manifest.media_type,
        "ETag": f'"{manifest.digest}"',
    }
    return Response(b"" if head else manifest.body, headers=headers)


def blob_headers(digest: str) -> dict[str, str]:
    """What every blob answer carries; content by digest never changes, so it may be cached for good."""
    return {
        **API_VERSION,
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
    }


class BlobResponse(Response):
    def __init__(
        self,
        reader: BlobReader,
        size: int | None,
        headers: dict[str, str],
        byte_range: tuple[int, int] | None = None,
        send_body: bool = True,
    ) -> None:
        self.reader = reader
        self.start, self.end = byte_range if byte_range else (0, None if size is None else size - 1)
        self.send_body = send_body
        self.status_code = 206 if byte_range else 200
        self.background = None
        if byte_range:
            headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{size}"
        if self.end is not None:
            headers["Content-Length"] = str(self.end - self.start + 1)
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if self.send_body and ZEROCOPY in scope.get("extensions", ()) and isinstance(self.reader, FileExtents):
                await self._send_from_file(self.reader, send)
            elif self.send_body:
                offset, end = self.start, self.end
                while end is None or offset <= end:
                    chunk = await self.reader.read(offset, _UNBOUNDED if end is None else end - offset + 1)
                    if not chunk:
                        break
                    offset += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.reader.close()

    async def _send_from_file(self, reader: FileExtents, send: Send) -> None:
        offset, end = self.start, self.end
        while end is None or offset <= end:
            fd, count = await reader.extent(offset, _UNBOUNDED if end is None else end - offset + 1)
            if not count:
                break
            await send({"type": ZEROCOPY, "file": fd, "offset": offset, "count": count, "more_body": True})
            offset += count
