"""Downloads in flight: one upstream fetch per digest, read by every waiting client at once.

A download is owned by the cache, not by the request that started it: it goes on when
that client leaves, writes into a private partial file, hashes as it goes, and renames
the file into the store only when the digest matches. Readers follow the partial file
with `pread` on a shared descriptor, so memory stays flat however many wait or however
large the blob. The last byte is held back until the digest is verified, so a reader
never sees a clean end of wrong or missing bytes: a failed download raises instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from cache import digests
from cache.store import ContentStore

READ_SIZE = 1 << 20


class DownloadFailed(Exception):
    """The upstream transfer broke off, or its bytes did not match the digest."""


@dataclass
class Source:
    """An upstream response ready to stream: what the opener hands a download."""

    size: int | None
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


class Download:
    def __init__(self, digest: str, path: Path) -> None:
        self.digest = digest
        self.path = path
        self.size: int | None = None
        self.written = 0
        self.committed = False
        self.error: BaseException | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress = asyncio.Event()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._readers = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def available(self) -> int:
        """Bytes a reader may have: all once verified, else all but the last byte."""
        return self.written if self.committed else max(0, self.written - 1)

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, waiting for them; b"" at the verified end."""
        while True:
            available = self.available()
            if offset < available:
                count = min(size, available - offset)
                return await to_thread.run_sync(os.pread, self._fd, count, offset)
            if self.error is not None:
                raise DownloadFailed(str(self.error)) from self.error
            if self.committed:
                return b""
            await self._progress.wait()

    def acquire(self) -> None:
        self._readers += 1

    def release(self) -> None:
        self._readers -= 1
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._readers == 0 and self.done and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Downloads:
    """The registry of downloads in flight in this process, keyed by digest."""

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        self._running: dict[str, Download] = {}

    def in_flight(self, digest: str) -> Download | None:
        return self._running.get(digest)

    def count(self) -> int:
        return len(self._running)

    def join(self, digest: str, opener: Callable[[], Awaitable[Source]]) -> Download:
        """The download of `digest`, started with `opener` unless one is running already.

        The caller must `acquire()` it now and `release()` it when done reading.
        """
        download = self._running.get(digest)
        if download is None:
            path = self._store.partial_dir / f"{digest.replace(':', '-')}.{uuid.uuid4().hex}"
            download = Download(digest, path)
            self._running[digest] = download
            download._task = asyncio.create_task(self._run(download, opener), name=f"download {digest}")
        return download

    async def _run(self, download: Download, opener: Callable[[], Awaitable[Source]]) -> None:
        source: Source | None = None
        try:
            source = await opener()
            download.size = source.size
            download.started.set_result(None)
            hasher = digests.hasher(download.digest)
            with open(download._fd, "wb", closefd=False, buffering=0) as out:

                def write(chunk: bytes) -> None:
                    out.write(chunk)
                    hasher.update(chunk)

                async for chunk in source.chunks:
                    await to_thread.run_sync(write, chunk)
                    download.written += len(chunk)
                    if download.size is not None and download.written > download.size:
                        raise DownloadFailed(f"upstream sent more than {download.size} bytes")
                    download._notify()
            if download.size is not None and download.written != download.size:
                raise DownloadFailed(f"upstream sent {download.written} of {download.size} bytes")
            actual = f"{digests.parse(download.digest)[0]}:{hasher.hexdigest()}"
            if actual != download.digest:
                raise DownloadFailed(f"upstream bytes hash to {actual}, not {download.digest}")
            await to_thread.run_sync(self._store.put_blob, download.digest, download.path)
            download.committed = True
        except BaseException as exc:  # every failure must reach every reader
            download.error = exc
            if not download.started.done():
                download.started.set_exception(exc)
                # Mark it retrieved: readers that left already must not cause a warning.
                download.started.exception()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(download.path)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._running.pop(download.digest, None)
            download._notify()
            download._maybe_close()
            if source is not None:
                with contextlib.suppress(Exception):
                    await source.close()
