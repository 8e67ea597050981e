"""Uniform readers over a cached blob file and a download in flight, for the HTTP layer."""

from __future__ import annotations

import os
from typing import Protocol

from cache import threads
from cache.flight import READ_SIZE, Download


class BlobReader(Protocol):
    @property
    def size(self) -> int | None: ...

    async def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, as many as are at hand; b"" at the end.

        Raises if the bytes cannot be had.
        """
        ...

    def close(self) -> None: ...


class FileReader:
    """A verified blob on disk. The open descriptor survives eviction of the file."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size: int | None = size

    async def read(self, offset: int, size: int) -> bytes:
        return await threads.run(os.pread, self._fd, min(size, READ_SIZE), offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DownloadReader:
    """One client's view of a shared download."""

    def __init__(self, download: Download) -> None:
        self._download = download
        download.acquire()
        self._open = True

    @property
    def size(self) -> int | None:
        """Known once the download has started."""
        return self._download.size

    async def read(self, offset: int, size: int) -> bytes:
        return await self._download.read(offset, size)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._download.release()
