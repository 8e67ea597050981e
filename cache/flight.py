"""Downloads in flight: one upstream fetch per digest, read by every waiting client at once.

A download is owned by the cache, not by the request that started it: it goes on when
that client leaves, writes into a partial file, hashes as it goes, and renames the file
into the store only when the digest matches. An upstream body that can be read blockingly
(`BlockingSource`) is received, written and hashed by the download's own thread, so its
bytes never pass through the event loop: the loop only learns how far the file has grown.
Readers follow the partial file (with `sendfile`, or `pread`), so memory stays flat
however many wait or however large the blob. The last byte is held back until the digest
is verified and the blob stored (flushed to the disk), so a reader never sees a clean end
of wrong or missing bytes: a failed download raises instead, and a client that got the
whole blob finds it in the cache.

Downloads count against the cache's `max_size` while in flight: each reserves room
(its size, or for a blob of unknown size a growing share) and the store evicts to make
it; a blob larger than the cache, or one for which pinned content and other downloads
leave no room, fails with `NoRoom` and stores nothing.

Worker processes sharing one cache directory fetch each digest once between them: the
owner holds an exclusive `flock` on `<digest>.lock` for the whole download and writes
`<digest>.json` (size and reservation) once the upstream answered; other processes
follow the growing `<digest>.data`, and learn the outcome when the lock is released:
committed if the store's file for the digest is the one they followed, failed
otherwise. The owner unlinks the lock file before releasing it, so nothing is left
behind; whoever takes a lock checks that its path still names the file it locked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import fcntl
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache import digests, threads
from cache.readers import READ_SIZE
from cache.storage import ContentStore

MAX_PENDING = 1 << 20  # received bytes waiting for the disk before the upstream is read more slowly
RECENT = 4 << 20  # the last bytes written, kept in memory for readers that keep up (once one reads bytes)
FOLLOW_POLL = 0.01  # how often a follower in another process looks for progress
HEADERS_WAIT = 60.0  # how long a follower waits for the owner's upstream to answer
WRITEBACK_STEP = 8 << 20  # written bytes handed to the disk as the download goes, so the flush at the end is short
RESERVE_STEP = 64 << 20  # the first reservation of a blob of unknown size; it doubles as it grows
LOCK_TRIES = 100  # attempts to lock a download whose lock file is being replaced meanwhile
SUFFIXES = (".data", ".json", ".json-new", ".lock")  # the files of a download in the partial area, lock last


class DownloadFailed(Exception):
    """The upstream transfer broke off, its bytes did not match the digest, or they could not be kept."""


class Shortage(enum.Enum):
    BLOB_TOO_LARGE = "blob too large"  # larger than the whole cache: retrying cannot help
    CACHE_FULL = "cache full"  # pinned content and other downloads leave no room now


class NoRoom(DownloadFailed):
    """The cache cannot hold the blob: it is not downloaded (or no further)."""

    def __init__(self, shortage: Shortage, message: str) -> None:
        super().__init__(message)
        self.shortage = shortage


class AlreadyCached(Exception):
    """Another process committed the blob just before this one could start: read the store."""


@dataclass
class Source:
    """An upstream response ready to stream: what an `Origin` hands a download."""

    size: int | None
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


@dataclass
class BlockingSource:
    """An upstream response whose body is read blockingly, by the download's own thread.

    Iterating `chunks` may wait for the network and raises when the transfer breaks off;
    `close` (blocking, quick) is called once, by that same thread, when the download has
    taken what it wanted or failed. Neither is ever called on the event loop.
    """

    size: int | None
    chunks: Iterator[bytes]
    close: Callable[[], None]


# Where a download's bytes come from: called once, by the download that fetches, to open
# the upstream's answer (raising the upstream's error when there is none). The only code
# of its callers' that the cache runs.
Origin = Callable[[], Awaitable[Source | BlockingSource]]


@dataclass(frozen=True, slots=True)
class Joined:
    """A reader of a download that has started (close it when done), and what the caller needs to know."""

    reader: DownloadReader
    size: int | None  # None: the upstream did not say
    joined: bool  # True: another request of this process had started it


class _Paths:
    def __init__(self, directory: Path, digest: str) -> None:
        stem = directory / digest.replace(":", "-")
        self.lock = stem.with_suffix(".lock")
        self.data = stem.with_suffix(".data")
        self.info = stem.with_suffix(".json")


class Download:
    """A download as its readers see it, whichever process fetches it."""

    def __init__(self, digest: str, on_done: Callable[[Download], None]) -> None:
        self.digest = digest
        self.size: int | None = None
        self.committed = False
        self.error: BaseException | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fd = -1
        self._readers = 0
        self._copying = False  # a reader took bytes with `read` (not `extent`): recent bytes are worth keeping
        self._task: asyncio.Task[None] | None = None
        self._on_done = on_done  # told once, when the download committed or failed

    def begin(self, work: Coroutine[Any, Any, None]) -> None:
        """Run the download's work as a task of its own: it goes on when the first reader leaves."""
        self._task = asyncio.create_task(work, name=f"download {self.digest}")

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

    def available(self) -> int:
        """How many bytes from the start a read returns without waiting (the last is held back until verified)."""
        written = self._written() if self._fd >= 0 else 0
        return written if self.committed else max(0, written - 1)

    async def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (as many as are at hand), waiting for them; b"" at the verified end."""
        self._copying = True
        while True:
            written = self._written()
            available = written if self.committed else max(0, written - 1)
            if offset < available:
                count = min(size, available - offset)
                recent = self._recent(offset, count)
                if recent is not None:
                    return recent
                data = await threads.run(os.pread, self._fd, min(count, READ_SIZE), offset)
                if not data:  # the file is shorter than what was written to it
                    raise DownloadFailed(f"the partial file of {self.digest} lost bytes")
                return data
            if self.error is not None:
                raise DownloadFailed(str(self.error)) from self.error
            if self.committed:
                return b""
            await self._wait()

    async def extent(self, offset: int, size: int) -> tuple[int, int]:
        """(fd, count): like `read`, but says where the bytes are in the partial file instead of reading them;
        the bytes counted are written (in the page cache, for `os.sendfile`)."""
        while True:
            written = self._written()
            available = written if self.committed else max(0, written - 1)
            if offset < available:
                return self._fd, min(size, available - offset)
            if self.error is not None:
                raise DownloadFailed(str(self.error)) from self.error
            if self.committed:
                return self._fd, 0
            await self._wait()

    def acquire(self) -> None:
        self._readers += 1

    def release(self) -> None:
        self._readers -= 1
        if self._readers == 0 and not self.done:
            self._abandon()
        self._maybe_close()

    def _abandon(self) -> None:
        """The last reader left before the end."""

    def _maybe_close(self) -> None:
        if self._readers == 0 and self.done and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _start(self, size: int | None) -> None:
        self.size = size
        if not self.started.done():
            self.started.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is not None:
            return
        self.error = exc
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # retrieved: readers that left already must not cause a warning
        self._on_done(self)


class _Fetch(Download):
    """This process fetches from the upstream."""

    def __init__(self, digest: str, paths: _Paths, lock_fd: int, on_done: Callable[[Download], None]) -> None:
        super().__init__(digest, on_done)
        self.paths = paths
        self._lock_fd = lock_fd
        self.written = 0
        self.reserved = 0  # bytes of the cache's max_size this download holds
        self._progress = asyncio.Event()
        self._batches: collections.deque[tuple[int, bytes]] = collections.deque()  # (offset, bytes)
        self._batched = 0
        # From the writing thread to the loop: (length, the bytes when a reader copies) per chunk written.
        # Each count written by one side only, so no update is lost: their difference is what
        # `_arriving` holds in bytes, at most about RECENT.
        self._arriving: collections.deque[tuple[int, bytes | None]] = collections.deque()
        self._queued_kept = 0  # by the thread
        self._taken_kept = 0  # by the loop
        self._posted = False  # a `_grown` call is on its way to the loop

    def _written(self) -> int:
        return self.written

    def _recent(self, offset: int, count: int) -> bytes | None:
        for start, batch in self._batches:
            if start <= offset < start + len(batch):
                begin = offset - start
                return batch[begin : begin + count]  # the batch itself when it is all asked for
        return None

    def _wrote(self, batch: bytes) -> None:
        self._keep(batch)
        self.written += len(batch)
        self._notify()

    def _keep(self, batch: bytes) -> None:
        """Remember `batch`, about to be counted as written, for readers that copy (up to RECENT bytes)."""
        if self._copying:  # readers served with sendfile (`extent`) need no copy in memory
            self._batches.append((self.written, batch))
            self._batched += len(batch)
            while self._batched > RECENT and len(self._batches) > 1:
                self._batched -= len(self._batches.popleft()[1])

    async def _wait(self) -> None:
        await self._progress.wait()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def run(self, store: ContentStore, opener: Origin) -> None:
        source: Source | BlockingSource | None = None
        paths = self.paths
        try:
            if await threads.run(store.has_blob, self.digest):
                raise AlreadyCached(self.digest)
            await threads.run(self._create_data_file)
            source = await opener()
            if source.size is not None and source.size > store.max_size:
                raise NoRoom(
                    Shortage.BLOB_TOO_LARGE,
                    f"blob {self.digest} ({source.size} bytes) is larger than the whole cache"
                    f" ([cache] max_size = {store.max_size} bytes)",
                )
            self.size = source.size
            if source.size is None:  # reserved as it grows
                await threads.run(self._reserve, store, 0, RESERVE_STEP)
            else:
                await threads.run(self._reserve, store, source.size, source.size)
            self._start(source.size)
            check = digests.Check(self.digest)
            appended = 0  # bytes written, as the writing thread counts them (`written` follows on the loop)
            handed_over = 0  # bytes whose writeback was started

            def write(fd: int, batch: bytes) -> None:
                """Blocking: append `batch` to the partial file, hash it, reserve room for it."""
                nonlocal appended, handed_over
                end = appended + len(batch)
                if end > self.reserved:  # only when the size is unknown
                    self._reserve(store, end, max(end, 2 * self.reserved))
                _write_all(fd, batch)
                check.update(batch)  # only what is on the disk counts
                appended = end
                if end - handed_over >= WRITEBACK_STEP:
                    _start_writeback(fd, handed_over, end - handed_over)
                    handed_over = end

            limit = store.max_size if source.size is None else source.size
            if isinstance(source, BlockingSource):
                blocking, source = source, None  # its thread closes it
                await self._receive_in_thread(blocking, write, limit)
            else:
                await self._write_as_it_arrives(source.chunks, lambda batch: write(self._fd, batch), limit)
            if self.size is not None and self.written != self.size:
                raise DownloadFailed(f"upstream sent {self.written} of {self.size} bytes")
            if not check.matches():
                raise DownloadFailed(f"upstream bytes hash to {check.actual}, not {self.digest}")
            on_disk = (await threads.run(os.fstat, self._fd)).st_size
            if on_disk != self.written:
                raise DownloadFailed(f"the partial file of {self.digest} holds {on_disk} of {self.written} bytes")
            await threads.run(store.put_blob, self.digest, paths.data, self.written)
            self._batches.clear()  # later readers, if any, read the file
            self.committed = True
            self._on_done(self)
        except BaseException as exc:  # every failure must reach every reader
            if isinstance(exc, OSError):  # e.g. the disk is full
                failure: BaseException = DownloadFailed(f"the download of {self.digest} could not be kept: {exc}")
            else:
                failure = exc
            self._fail(failure)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.data)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.info)
            # Unlinked before the flock is released, so no process can lock this file after us.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.lock)
            os.close(self._lock_fd)  # releases the flock: followers elsewhere learn the outcome
            self._notify()
            self._maybe_close()
            if isinstance(source, BlockingSource):  # failed before its thread started
                with contextlib.suppress(Exception):
                    await threads.run(source.close)
            elif source is not None:
                with contextlib.suppress(Exception):
                    await source.close()

    def _reserve(self, store: ContentStore, needed: int, wanted: int) -> None:
        """Blocking: hold at least `needed` (up to `wanted`) bytes of max_size, evicting to make room.

        Taken under the cache-wide budget lock and recorded in the info file, so that
        every process counts every download in flight. Raises `NoRoom`.
        """
        if needed > store.max_size:
            raise NoRoom(
                Shortage.BLOB_TOO_LARGE,
                f"blob {self.digest} (no size announced) grew larger than the whole cache"
                f" ([cache] max_size = {store.max_size} bytes)",
            )
        with _budget(store):
            others = partial_bytes(store.partial_dir, exclude=self.paths.data.name)
            free = store.make_room(others + needed) + needed
            if free < needed:
                raise NoRoom(
                    Shortage.CACHE_FULL,
                    f"no room in the cache for blob {self.digest} ({needed} bytes): pinned content and"
                    f" downloads in progress leave {max(free, 0)} of [cache] max_size ({store.max_size} bytes)",
                )
            self.reserved = min(wanted, free, store.max_size)
            _write_info(self.paths.info, self.size, self.reserved)

    def _too_much(self, limit: int) -> DownloadFailed:
        """The failure of a body that went past `limit`: its announced size, or the whole cache."""
        if self.size is not None:
            return DownloadFailed(f"upstream sent more than {self.size} bytes")
        return NoRoom(
            Shortage.BLOB_TOO_LARGE,
            f"blob {self.digest} (no size announced) is larger than the whole cache ([cache] max_size = {limit} bytes)",
        )

    async def _receive_in_thread(self, source: BlockingSource, write: Callable[[int, bytes], None], limit: int) -> None:
        """Receive, write and hash on a thread of this download's own, until the body ends.

        The loop is told how far the file has grown (`_grown`), at most once per turn of it
        however many chunks arrived meanwhile; readers then take extents of the file (or
        recent bytes, up to RECENT of them, when they copy). The thread writes to a
        descriptor of its own: if this task is cancelled it stops at its next chunk (the
        upstream's read timeout bounds the wait), closing its descriptor and the source.
        """
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        stop = threading.Event()
        fd = os.dup(self._fd)

        def post(callback: Callable[..., object], *args: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
                loop.call_soon_threadsafe(callback, *args)

        def receive() -> None:
            failure: BaseException | None = None
            received = 0
            try:
                for chunk in source.chunks:
                    if stop.is_set():
                        raise DownloadFailed(f"the download of {self.digest} was stopped")
                    received += len(chunk)
                    if received > limit:
                        raise self._too_much(limit)
                    write(fd, chunk)
                    kept = chunk if self._copying and self._queued_kept - self._taken_kept < RECENT else None
                    if kept is not None:
                        self._queued_kept += len(kept)
                    self._arriving.append((len(chunk), kept))
                    if not self._posted:
                        self._posted = True
                        post(self._grown)
            except BaseException as exc:  # every failure reaches the download
                failure = exc
            finally:
                with contextlib.suppress(Exception):
                    source.close()
                os.close(fd)
                post(_settle, finished, failure)

        try:
            threading.Thread(target=receive, name=f"download {self.digest[:19]}", daemon=True).start()
        except BaseException:
            with contextlib.suppress(Exception):
                source.close()
            os.close(fd)
            raise
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:
            stop.set()
            finished.add_done_callback(_retrieved)  # nobody awaits it any more
            raise

    def _grown(self) -> None:
        """On the loop: what the thread wrote since it last told, now visible to readers."""
        self._posted = False
        arriving = self._arriving
        while arriving:
            length, chunk = arriving.popleft()
            if chunk is not None:
                self._taken_kept += length
                self._keep(chunk)
            self.written += length
        self._notify()

    async def _write_as_it_arrives(
        self, chunks: AsyncIterator[bytes], write: Callable[[bytes], None], limit: int
    ) -> None:
        """Receive and write concurrently: what arrives during a write goes into the next one.

        Each write (and hash) costs a thread hop; batching what the network delivered
        meanwhile keeps that cost per batch, not per 64 KiB read, while the first bytes
        still go out at once. At most MAX_PENDING bytes wait in memory, and at most
        `limit` bytes are taken from the upstream.
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
                if received > limit:
                    raise self._too_much(limit)
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

    def __init__(
        self, digest: str, paths: _Paths, store: ContentStore, lock_fd: int, on_done: Callable[[Download], None]
    ) -> None:
        super().__init__(digest, on_done)
        self.paths = paths
        self._store = store
        self._lock_fd = lock_fd  # the owner's lock file as it was when we looked: its outcome is ours

    def _written(self) -> int:
        return os.fstat(self._fd).st_size

    async def _wait(self) -> None:
        """Every reader waiting looks for itself; the first to see the outcome settles it for all."""
        await asyncio.sleep(FOLLOW_POLL)
        if self.done or await self._owner_active() or self.done:
            return
        # The owner is done: its data was written before the lock was released.
        ours = await threads.run(self._stored_is_ours, os.dup(self._fd))
        if self.done:
            return
        if ours:
            self.size = self._written()
            self.committed = True
            self._close_lock()
            self._on_done(self)
        else:
            self._fail(DownloadFailed(f"the download of {self.digest} in another worker failed"))

    async def _until_owner_done(self) -> None:
        """Wait (bounded) until the owner has released its lock: its outcome is then in the store."""
        for _ in range(int(HEADERS_WAIT / FOLLOW_POLL)):
            if not await self._owner_active():
                return
            await asyncio.sleep(FOLLOW_POLL)

    async def _owner_active(self) -> bool:
        """Whether the owner still holds its lock. The probe works on a duplicate descriptor: ours may be
        closed meanwhile (the outcome settled by another reader), and its number reused."""
        if self._lock_fd < 0:
            return False
        return await threads.run(_held_closing, os.dup(self._lock_fd))

    def _stored_is_ours(self, data_fd: int) -> bool:
        """Blocking: whether the store's file for the digest is `data_fd`'s, the one followed (not a later
        download's). Closes `data_fd`."""
        try:
            found = self._store.find_blob(self.digest)
            if found is None:
                return False
            return _same_file(os.stat(found[0]), os.fstat(data_fd))
        except FileNotFoundError:  # evicted already: our readers cannot be told it was complete
            return False
        finally:
            os.close(data_fd)

    def _fail(self, exc: BaseException) -> None:
        super()._fail(exc)
        self._close_lock()

    def _close_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _abandon(self) -> None:
        """Nobody here reads it any more: stop following, so its partial file is not kept open."""
        self._fail(DownloadFailed(f"no reader follows the download of {self.digest} any more"))
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def run(self) -> None:
        """Wait for the owner's upstream to answer, then open its partial file."""
        try:
            for _ in range(int(HEADERS_WAIT / FOLLOW_POLL)):
                try:
                    info = await threads.run(_read_info, self.paths.info)
                    if info is not None:
                        self._fd = await threads.run(os.open, self.paths.data, os.O_RDONLY)
                except (FileNotFoundError, ValueError):
                    # The owner finished between our looks: its file is in the store, but the store's
                    # index may not have it until the owner releases its lock.
                    await self._until_owner_done()
                    raise AlreadyCached(self.digest) from None
                if info is not None:
                    self._start(None if info < 0 else info)
                    return
                if not await self._owner_active():
                    # Finished before we looked, or failed before the upstream answered.
                    raise AlreadyCached(self.digest)
                await asyncio.sleep(FOLLOW_POLL)
            raise DownloadFailed(f"the download of {self.digest} in another worker did not start")
        except BaseException as exc:
            self._fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[None], failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is None:
        future.set_result(None)
    else:
        future.set_exception(failure)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte or raise: `write` may write fewer bytes than given (a nearly full disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"writing the partial file made no progress ({len(view)} bytes left)")
        view = view[written:]


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a range out now, without waiting (Linux: DONTNEED starts the
    writeback of dirty pages; it drops only pages already clean), so that the flush before the commit is short."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _write_info(path: Path, size: int | None, reserved: int) -> None:
    staging = path.with_suffix(".json-new")
    try:
        staging.write_text(json.dumps({"size": size, "reserved": reserved}))
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def _read_info(path: Path) -> int | None:
    """The size the owner announced (-1 standing for "unknown"), or None before it did."""
    try:
        size = json.loads(path.read_text())["size"]
    except FileNotFoundError:
        return None
    return -1 if size is None else int(size)


def _reserved(path: Path) -> int:
    """The reservation an info file records (0 when there is none, or it is being replaced)."""
    try:
        return int(json.loads(path.read_text()).get("reserved", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def partial_bytes(directory: Path, exclude: str = "") -> int:
    """Blocking: bytes the partial area holds or has reserved, every process's downloads included.

    A download counts as its reservation or its file, whichever is larger; other
    files (imports being staged) as their size. `exclude` names a data file to skip.
    """
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name == exclude or entry.name.endswith((".lock", ".json", ".json-new")):
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            if entry.name.endswith(".data"):
                size = max(size, _reserved(directory / (entry.name.removesuffix(".data") + ".json")))
            total += size
    return total


@contextlib.contextmanager
def _budget(store: ContentStore) -> Iterator[None]:
    """Blocking: the cache-wide lock under which downloads reserve room (never unlinked)."""
    fd = os.open(store.directory / "budget.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _take_lock(path: Path) -> tuple[int, bool]:
    """An open descriptor of the download lock at `path`, and whether this process now holds it.

    A lock taken on a file its owner has unlinked meanwhile is worthless (a new lock
    file may exist by that name): then try again.
    """
    for _ in range(LOCK_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd, False
        try:
            if _same_file(os.fstat(fd), os.stat(path)):
                return fd, True
        except FileNotFoundError:
            pass
        os.close(fd)
    raise DownloadFailed(f"could not lock {path.name}: its lock file kept being replaced")


def _held_closing(fd: int) -> bool:
    """Whether some process holds the download lock open as `fd` (probing with a shared lock). Closes `fd`."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)  # closing a duplicate alone would not release it
        return False
    finally:
        os.close(fd)


def remove_abandoned(directory: Path) -> int:
    """Blocking: remove the files of downloads no process runs (a crash's leftovers); how many downloads.

    Each one's lock is taken first, so downloads running in other workers are left alone.
    """
    stems = {name.rsplit(".", 1)[0] for name in os.listdir(directory) if name.endswith(SUFFIXES)}
    removed = 0
    for stem in stems:
        lock = directory / f"{stem}.lock"
        try:
            fd, held = _take_lock(lock)
        except (OSError, DownloadFailed):
            continue
        try:
            if not held:
                continue
            for suffix in SUFFIXES:  # the lock last, and before it is released
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / f"{stem}{suffix}")
            removed += 1
        finally:
            os.close(fd)
    return removed


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

    def available(self) -> int:
        """Bytes from the start that can be read now, without waiting for the upstream."""
        return self._download.available()

    async def read(self, offset: int, size: int) -> bytes:
        return await self._download.read(offset, size)

    async def extent(self, offset: int, size: int) -> tuple[int, int]:
        return await self._download.extent(offset, size)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._download.release()


class Downloads:
    """The downloads this process fetches or follows, keyed by digest."""

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        self._running: dict[str, Download] = {}
        store.in_flight = lambda: partial_bytes(store.partial_dir)  # every eviction counts them

    def in_flight(self, digest: str) -> Download | None:
        return self._running.get(digest)

    def fetching(self) -> int:
        """Downloads this process fetches from an upstream (not those it follows in another worker)."""
        return sum(isinstance(download, _Fetch) for download in self._running.values())

    def readers(self) -> int:
        """Clients of this process reading a download in flight, at the upstream's pace."""
        return sum(download._readers for download in self._running.values())

    async def read(self, digest: str, origin: Origin) -> Joined | None:
        """A reader of the download of `digest` once it has started, or None: the store has the
        blob now (another worker committed it), read it there. Raises what `origin` raised."""
        joined = digest in self._running
        download = self.join(digest, origin)
        reader = DownloadReader(download)
        try:
            await asyncio.shield(download.started)
        except AlreadyCached:
            reader.close()
            return None
        except BaseException:
            reader.close()
            raise
        return Joined(reader, download.size, joined)

    def join(self, digest: str, origin: Origin) -> Download:
        """The download of `digest`: one running here, one another worker runs, or a new one.

        The lower-level `read`: `started` may raise `AlreadyCached` (then the store has the
        blob), and the caller must `acquire()` the download and `release()` it when done.
        """
        running = self._running.get(digest)
        if running is not None:
            return running
        paths = _Paths(self._store.partial_dir, digest)
        lock_fd, owner = _take_lock(paths.lock)
        download: Download
        if owner:
            fetch = _Fetch(digest, paths, lock_fd, self._forget)
            fetch.begin(fetch.run(self._store, origin))
            download = fetch
        else:
            follow = _Follow(digest, paths, self._store, lock_fd, self._forget)
            follow.begin(follow.run())
            download = follow
        self._running[digest] = download
        return download

    def _forget(self, download: Download) -> None:
        if self._running.get(download.digest) is download:
            del self._running[download.digest]
