"""Downloads in flight: one upstream fetch per digest, read by every waiting client at once.

A download is owned by the cache, not by the request that started it: it goes on when
that client leaves, writes into a partial file, hashes as it goes, and renames the file
into the store only when the digest matches. Readers follow the partial file with
`pread`, so memory stays flat however many wait or however large the blob. The last
byte is held back until the digest is verified, so a reader never sees a clean end of
wrong or missing bytes: a failed download raises instead.

Worker processes sharing one cache directory fetch each digest once between them: the
owner holds an exclusive `flock` on `<digest>.lock` for the whole download and writes
`<digest>.json` (the size) once the upstream answered; other processes follow the
growing `<digest>.data`, and learn the outcome when the lock is released: committed if
the store has the digest by then, failed otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cache import digests, threads
from cache.store import ContentStore

MAX_PENDING = 1 << 20  # received bytes waiting for the disk before the upstream is read more slowly
RECENT = 4 << 20  # the last bytes written, kept in memory for readers that keep up
READ_SIZE = 1 << 20  # the most one file read returns
FOLLOW_POLL = 0.01  # how often a follower in another process looks for progress
HEADERS_WAIT = 60.0  # how long a follower waits for the owner's upstream to answer


class DownloadFailed(Exception):
    """The upstream transfer broke off, or its bytes did not match the digest."""


class AlreadyCached(Exception):
    """Another process committed the blob just before this one could start: read the store."""


@dataclass
class Source:
    """An upstream response ready to stream: what the opener hands a download."""

    size: int | None
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


class _Paths:
    def __init__(self, directory: Path, digest: str) -> None:
        stem = directory / digest.replace(":", "-")
        self.lock = stem.with_suffix(".lock")
        self.data = stem.with_suffix(".data")
        self.info = stem.with_suffix(".json")


class Download:
    """A download as its readers see it, whichever process fetches it."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.size: int | None = None
        self.committed = False
        self.error: BaseException | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fd = -1
        self._readers = 0
        self._task: asyncio.Task[None] | None = None
        self.on_done: Callable[[], None] = lambda: None

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def _written(self) -> int:
        raise NotImplementedError

    def _recent(self, offset: int, count: int) -> bytes | None:
        """Bytes still in memory, sparing a file read; None when they are not."""
        return None

    async def _wait(self) -> None:
        raise NotImplementedError

    async def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (as many as are at hand), waiting for them; b"" at the verified end."""
        while True:
            written = self._written()
            available = written if self.committed else max(0, written - 1)
            if offset < available:
                count = min(size, available - offset)
                recent = self._recent(offset, count)
                if recent is not None:
                    return recent
                return await threads.run(os.pread, self._fd, min(count, READ_SIZE), offset)
            if self.error is not None:
                raise DownloadFailed(str(self.error)) from self.error
            if self.committed:
                return b""
            await self._wait()

    def acquire(self) -> None:
        self._readers += 1

    def release(self) -> None:
        self._readers -= 1
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._readers == 0 and self.done and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _start(self, size: int | None) -> None:
        self.size = size
        if not self.started.done():
            self.started.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # retrieved: readers that left already must not cause a warning
        self.on_done()


class _Fetch(Download):
    """This process fetches from the upstream."""

    def __init__(self, digest: str, paths: _Paths, lock_fd: int) -> None:
        super().__init__(digest)
        self.paths = paths
        self._lock_fd = lock_fd
        self.written = 0
        self._progress = asyncio.Event()
        self._batches: collections.deque[tuple[int, bytes]] = collections.deque()  # (offset, bytes)
        self._batched = 0

    def _written(self) -> int:
        return self.written

    def _recent(self, offset: int, count: int) -> bytes | None:
        for start, batch in self._batches:
            if start <= offset < start + len(batch):
                begin = offset - start
                return batch[begin : begin + count]  # the batch itself when it is all asked for
        return None

    def _wrote(self, batch: bytes) -> None:
        self._batches.append((self.written, batch))
        self._batched += len(batch)
        while self._batched > RECENT and len(self._batches) > 1:
            self._batched -= len(self._batches.popleft()[1])
        self.written += len(batch)
        self._notify()

    async def _wait(self) -> None:
        await self._progress.wait()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def run(self, store: ContentStore, opener: Callable[[], Awaitable[Source]]) -> None:
        source: Source | None = None
        paths = self.paths
        try:
            if await threads.run(store.has_blob, self.digest):
                raise AlreadyCached(self.digest)
            await threads.run(self._create_data_file)
            source = await opener()
            await threads.run(_write_info, paths.info, source.size)
            self._start(source.size)
            hasher = digests.hasher(self.digest)
            with open(self._fd, "wb", closefd=False, buffering=0) as out:

                def write(batch: bytes) -> None:
                    out.write(batch)
                    hasher.update(batch)

                await self._write_as_it_arrives(source.chunks, write)
            if self.size is not None and self.written != self.size:
                raise DownloadFailed(f"upstream sent {self.written} of {self.size} bytes")
            actual = f"{digests.parse(self.digest)[0]}:{hasher.hexdigest()}"
            if actual != self.digest:
                raise DownloadFailed(f"upstream bytes hash to {actual}, not {self.digest}")
            await threads.run(store.put_blob, self.digest, paths.data)
            self._batches.clear()  # later readers, if any, read the file
            self.committed = True
            self.on_done()
        except BaseException as exc:  # every failure must reach every reader
            self._fail(exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.data)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.info)
            os.close(self._lock_fd)  # releases the flock: followers elsewhere learn the outcome
            self._notify()
            self._maybe_close()
            if source is not None:
                with contextlib.suppress(Exception):
                    await source.close()

    async def _write_as_it_arrives(self, chunks: AsyncIterator[bytes], write: Callable[[bytes], None]) -> None:
        """Receive and write concurrently: what arrives during a write goes into the next one.

        Each write (and hash) costs a thread hop; batching what the network delivered
        meanwhile keeps that cost per batch, not per 64 KiB read, while the first bytes
        still go out at once. At most MAX_PENDING bytes wait in memory.
        """
        pending: list[bytes] = []
        pending_size = 0
        ready = asyncio.Event()
        room = asyncio.Event()
        ended = False

        async def drain() -> None:
            nonlocal pending, pending_size
            while True:
                await ready.wait()
                ready.clear()
                batch, pending, pending_size = pending, [], 0
                room.set()
                if batch:
                    data = b"".join(batch)
                    await threads.run(write, data)
                    self._wrote(data)
                if ended and not pending:
                    return

        writer = asyncio.create_task(drain())
        try:
            received = 0
            async for chunk in chunks:
                received += len(chunk)
                if self.size is not None and received > self.size:
                    raise DownloadFailed(f"upstream sent more than {self.size} bytes")
                pending.append(chunk)
                pending_size += len(chunk)
                ready.set()
                if pending_size >= MAX_PENDING:
                    room.clear()
                    waiting = asyncio.ensure_future(room.wait())
                    await asyncio.wait({waiting, writer}, return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                    if writer.done():
                        break  # it failed: awaiting it below raises why
            ended = True
            ready.set()
            await writer
        finally:
            if not writer.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    def _create_data_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.data)  # left by a process that crashed mid-download
        self._fd = os.open(self.paths.data, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


class _Follow(Download):
    """Another process fetches; this one follows its partial file."""

    def __init__(self, digest: str, paths: _Paths, store: ContentStore) -> None:
        super().__init__(digest)
        self.paths = paths
        self._store = store

    def _written(self) -> int:
        return os.fstat(self._fd).st_size

    async def _wait(self) -> None:
        await asyncio.sleep(FOLLOW_POLL)
        if not await threads.run(_locked, self.paths.lock):
            # The owner is done: its data was flushed before the lock was released.
            if await threads.run(self._store.has_blob, self.digest):
                self.size = self._written()
                self.committed = True
                self.on_done()
            else:
                self._fail(DownloadFailed(f"the download of {self.digest} in another worker failed"))

    async def run(self) -> None:
        """Wait for the owner's upstream to answer, then open its partial file."""
        try:
            for _ in range(int(HEADERS_WAIT / FOLLOW_POLL)):
                info = await threads.run(_read_info, self.paths.info)
                if info is not None:
                    self._fd = await threads.run(os.open, self.paths.data, os.O_RDONLY)
                    self._start(None if info < 0 else info)
                    return
                if not await threads.run(_locked, self.paths.lock):
                    # Finished before we looked, or failed before the upstream answered.
                    raise AlreadyCached(self.digest)
                await asyncio.sleep(FOLLOW_POLL)
            raise DownloadFailed(f"the download of {self.digest} in another worker did not start")
        except (FileNotFoundError, ValueError):  # the owner finished between our looks
            self._fail(AlreadyCached(self.digest))
        except BaseException as exc:
            self._fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise


def _write_info(path: Path, size: int | None) -> None:
    staging = path.with_suffix(".json-new")
    staging.write_text(json.dumps({"size": size}))
    os.replace(staging, path)


def _read_info(path: Path) -> int | None:
    """The size the owner announced (-1 standing for "unknown"), or None before it did."""
    try:
        size = json.loads(path.read_text())["size"]
    except FileNotFoundError:
        return None
    return -1 if size is None else int(size)


def _locked(path: Path) -> bool:
    """Whether some process holds the download lock (probing with a shared lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a probe lock we got
    return False


class Downloads:
    """The downloads this process fetches or follows, keyed by digest."""

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        self._running: dict[str, Download] = {}

    def in_flight(self, digest: str) -> Download | None:
        return self._running.get(digest)

    def fetching(self) -> int:
        """Downloads this process fetches from an upstream (not those it follows in another worker)."""
        return sum(isinstance(download, _Fetch) for download in self._running.values())

    def readers(self) -> int:
        """Clients of this process reading a download in flight, at the upstream's pace."""
        return sum(download._readers for download in self._running.values())

    def join(self, digest: str, opener: Callable[[], Awaitable[Source]]) -> Download:
        """The download of `digest`: one running here, one another worker runs, or a new one.

        `started` may raise `AlreadyCached`: then the store has the blob. The caller must
        `acquire()` the download now and `release()` it when done reading.
        """
        download = self._running.get(digest)
        if download is not None:
            return download
        paths = _Paths(self._store.partial_dir, digest)
        lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            follow = _Follow(digest, paths, self._store)
            download, work = follow, follow.run()
        else:
            fetch = _Fetch(digest, paths, lock_fd)
            download, work = fetch, fetch.run(self._store, opener)
        self._running[digest] = download
        download.on_done = lambda: self._forget(download)
        download._task = asyncio.create_task(work, name=f"download {digest}")
        return download

    def _forget(self, download: Download) -> None:
        if self._running.get(download.digest) is download:
            del self._running[download.digest]
