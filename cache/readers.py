"""Readers of blob bytes, for the HTTP layer: a cached file here, a download in flight in `flight`."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from cache import threads

READ_SIZE = 1 << 20  # the most one read returns: what a reader holds in memory per client


class BlobReader(Protocol):
    @property
    def size(self) -> int | None:
        """None while (or when) the upstream did not say."""
        ...

    async def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, as many as are at hand; b"" at the end.

        Raises if the bytes cannot be had.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class FileExtents(Protocol):
    """A reader whose bytes are in a file, so that a server can send them with `os.sendfile`."""

    async def extent(self, offset: int, size: int) -> tuple[int, int]:
        """(fd, count): the next `count` bytes (at most `size`, as many as are on disk) at `offset`
        are in the open file `fd` at that same offset; count 0 at the end.

        Waits, and raises, as `read` does. `fd` stays open until the reader is closed.
        """
        ...


class FileReader:
    """A verified blob on disk. The open descriptor survives eviction of the file."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, size: int) -> bytes:
        return await threads.run(os.pread, self._fd, min(size, READ_SIZE), offset)

    async def extent(self, offset: int, size: int) -> tuple[int, int]:
        return self._fd, max(0, min(size, self._size - offset))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
