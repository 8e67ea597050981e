"""Downloads keep the cache honest: only complete, flushed, verified bytes are stored, in-flight bytes
count against max_size, and nothing a request creates in the partial area outlives its download."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cache import digests, flight
from cache.flight import BlockingSource, Download, DownloadFailed, DownloadReader, Downloads, Source
from cache.store import DiskContentStore
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import REPO_ROOT, Proxy

MIB = 1 << 20


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["on-the-loop", "on-a-thread"])
def blocking(request: pytest.FixtureRequest) -> bool:
    """Whether sources are read blockingly by the download's thread (`BlockingSource`, what an
    upstream over the network gives) or on the event loop (`Source`, an in-process transport's)."""
    return bool(request.param)


def _source(
    data: bytes,
    size: int | None,
    consumed: list[int],
    wait: Callable[[], Awaitable[object]] | None = None,
    blocking: bool = False,
) -> Source | BlockingSource:
    """`data` in 1 MiB chunks, recording each one taken; `wait` runs (on the loop) before every chunk but
    the first. `blocking`: a `BlockingSource`, whose chunks the download's thread takes."""
    if blocking:
        loop = asyncio.get_running_loop()

        def blocking_chunks() -> Iterator[bytes]:
            assert threading.current_thread() is not threading.main_thread(), "read on the event loop's thread"
            for offset in range(0, len(data), MIB):
                if offset and wait is not None:
                    asyncio.run_coroutine_threadsafe(wait(), loop).result(30)
                consumed.append(min(MIB, len(data) - offset))
                yield data[offset : offset + MIB]

        return BlockingSource(size, blocking_chunks(), lambda: None)

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), MIB):
            if offset and wait is not None:
                await wait()
            consumed.append(min(MIB, len(data) - offset))
            yield data[offset : offset + MIB]

    async def close() -> None:
        pass

    return Source(size, chunks(), close)


async def _read_all(download: Download) -> tuple[bytes, BaseException | None]:
    """What one reader gets: the body so far, and the error that ended it (None: a clean end)."""
    reader = DownloadReader(download)
    body = b""
    try:
        await download.started
        while chunk := await reader.read(len(body), 1 << 30):
            body += chunk
    except DownloadFailed as exc:
        return body, exc
    finally:
        reader.close()
    return body, None


async def _finished(download: Download) -> None:
    assert download._task is not None
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(download._task, 30)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 10 s")


def _leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# -- 1. every write complete, the size checked before the rename ------------------------------


def _download_with_short_writes(directory: str, blocking: bool) -> None:
    """In a child process: no file may grow past 1.5 MiB, so the write that crosses it is cut short."""
    data = os.urandom(2 * MIB)
    digest = digests.of(data)
    store = DiskContentStore(Path(directory), max_size=64 * MIB)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MIB + MIB // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    async def main() -> dict[str, object]:
        downloads = Downloads(store)

        async def first_batch_written() -> None:  # so the second MiB is a write of its own
            await _until(lambda: download._written() >= MIB)

        async def opener() -> Source | BlockingSource:
            return _source(data, len(data), [], first_batch_written, blocking=blocking)

        download = downloads.join(digest, opener)
        body, error = await _read_all(download)
        await _finished(download)
        stored = store.find_blob(digest)
        return {
            "clean_end": error is None,
            "body_is_the_blob": body == data,
            "stored_size": None if stored is None else stored[1],
            "left": _leftovers(store.partial_dir),
        }

    print(json.dumps(asyncio.run(main())))


def test_a_write_cut_short_fails_the_download_and_stores_nothing(tmp_path: Path, blocking: bool) -> None:
    code = (
        f"import sys; from {__name__} import _download_with_short_writes as run; run(sys.argv[1], sys.argv[2] == '1')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-c", code, str(tmp_path), "1" if blocking else "0"]
    child = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr.decode()
    outcome = json.loads(child.stdout.decode().splitlines()[-1])
    assert outcome["stored_size"] is None, "a blob missing bytes was stored under its digest"
    assert outcome["clean_end"] is False
    assert outcome["left"] == []


def test_put_blob_refuses_a_file_of_another_size_than_was_verified(tmp_path: Path) -> None:
    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(MIB)
    staged = store.partial_dir / "staged"
    staged.write_bytes(data[: MIB // 2])  # the second half never reached the disk
    with pytest.raises(Exception, match="verified"):
        store.put_blob(digests.of(data), staged, size=len(data))
    assert not store.has_blob(digests.of(data))
    store.close()


# -- 2. flushed before it becomes visible ------------------------------------------------------


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every fsync (of which inode) and rename (of which inode) in order."""
    events: list[tuple[str, int]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_rename(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        events.append(("rename", os.stat(source).st_ino))
        rename(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    return events


def test_a_blob_is_flushed_before_it_is_renamed_into_the_store_and_its_directory_after(
    tmp_path: Path, flushes: list[tuple[str, int]]
) -> None:
    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(MIB)
    staged = store.partial_dir / "staged"
    staged.write_bytes(data)
    blob = staged.stat().st_ino
    store.put_blob(digests.of(data), staged)
    found = store.find_blob(digests.of(data))
    assert found is not None and Path(found[0]).read_bytes() == data
    renamed = flushes.index(("rename", blob))
    assert ("fsync", blob) in flushes[:renamed], "the data must be on the disk before its name is"
    assert ("fsync", os.stat(os.path.dirname(found[0])).st_ino) in flushes[renamed:], "and the new name with it"
    store.close()


def test_a_manifest_large_enough_for_a_file_of_its_own_is_flushed(
    tmp_path: Path, flushes: list[tuple[str, int]]
) -> None:
    from cache.storage import Manifest

    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    body = json.dumps({"schemaVersion": 2, "padding": "x" * (64 << 10)}).encode()
    store.put_manifest(Manifest(digests.of(body), "application/vnd.oci.image.manifest.v1+json", body))
    (file,) = (tmp_path / "content").rglob("*.val")
    assert ("fsync", file.stat().st_ino) in flushes
    assert ("fsync", file.parent.stat().st_ino) in flushes
    store.close()


def test_a_stored_blob_that_lost_bytes_is_not_served_but_fetched_again(tmp_path: Path) -> None:
    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(MIB)
    staged = store.partial_dir / "staged"
    staged.write_bytes(data)
    store.put_blob(digests.of(data), staged)
    found = store.find_blob(digests.of(data))
    assert found is not None
    os.truncate(found[0], MIB // 2)  # what a disk that lies about flushes may leave after a power loss
    store.close()
    reopened = DiskContentStore(tmp_path, max_size=64 * MIB)
    assert reopened.find_blob(digests.of(data)) is None
    assert not reopened.has_blob(digests.of(data))
    reopened.close()


# -- 3. downloads in flight count against max_size -------------------------------------------


def test_a_blob_larger_than_the_cache_is_refused_before_its_bytes_are_fetched(tmp_path: Path, blocking: bool) -> None:
    store = DiskContentStore(tmp_path, max_size=4 * MIB)
    data = os.urandom(8 * MIB)
    consumed: list[int] = []

    async def main() -> None:
        async def opener() -> Source | BlockingSource:
            return _source(data, len(data), consumed, blocking=blocking)

        download = Downloads(store).join(digests.of(data), opener)
        _, error = await _read_all(download)
        await _finished(download)
        assert error is not None and "larger than the whole cache" in str(error)
        assert isinstance(download.error, flight.NoRoom)
        assert download.error.shortage is flight.Shortage.BLOB_TOO_LARGE

    asyncio.run(main())
    assert consumed == []
    assert not store.has_blob(digests.of(data))
    assert _leftovers(store.partial_dir) == []
    store.close()


def test_a_blob_of_unknown_size_is_cut_off_at_the_cache_size(tmp_path: Path, blocking: bool) -> None:
    store = DiskContentStore(tmp_path, max_size=4 * MIB)
    data = os.urandom(16 * MIB)
    consumed: list[int] = []

    async def main() -> None:
        async def opener() -> Source | BlockingSource:
            return _source(data, None, consumed, blocking=blocking)

        download = Downloads(store).join(digests.of(data), opener)
        _, error = await _read_all(download)
        await _finished(download)
        assert error is not None, "a blob bigger than the cache was served whole and so cached"
        assert isinstance(download.error, flight.NoRoom)

    asyncio.run(main())
    assert sum(consumed) <= 5 * MIB
    assert not store.has_blob(digests.of(data))
    assert _leftovers(store.partial_dir) == []
    store.close()


def test_downloads_in_flight_make_room_and_are_refused_when_there_is_none(tmp_path: Path, blocking: bool) -> None:
    store = DiskContentStore(tmp_path, max_size=5 * MIB)
    old, kept = os.urandom(MIB), os.urandom(MIB)
    for blob in (old, kept):
        staged = store.partial_dir / "staged"
        staged.write_bytes(blob)
        store.put_blob(digests.of(blob), staged)
    store.pin([digests.of(kept)])
    big, next_one, recent = os.urandom(3 * MIB), os.urandom(2 * MIB), os.urandom(MIB // 4)
    refused: list[int] = []

    async def main() -> None:
        downloads = Downloads(store)
        gate = asyncio.Event()

        async def slow_opener() -> Source | BlockingSource:
            return _source(big, len(big), [], gate.wait, blocking=blocking)

        async def next_opener() -> Source | BlockingSource:
            return _source(next_one, len(next_one), refused, blocking=blocking)

        in_flight = downloads.join(digests.of(big), slow_opener)
        reading = asyncio.create_task(_read_all(in_flight))
        await in_flight.started
        # Room was made for all 3 MiB at once: the least recently used blob is gone, the pinned one stays.
        assert store.find_blob(digests.of(old)) is None
        assert store.find_blob(digests.of(kept)) is not None
        assert store.volume() + len(big) <= 5 * MIB
        staged = store.partial_dir / "staged"
        staged.write_bytes(recent)
        store.put_blob(digests.of(recent), staged)
        # The pinned blob and the download leave no room for another 2 MiB: refused, not started,
        # and without evicting in vain what may be evicted.
        _, error = await _read_all(downloads.join(digests.of(next_one), next_opener))
        assert isinstance(error, flight.NoRoom) and error.shortage is flight.Shortage.CACHE_FULL
        assert store.find_blob(digests.of(recent)) is not None
        gate.set()
        assert await reading == (big, None)
        await _finished(in_flight)

    asyncio.run(main())
    assert refused == []
    assert store.has_blob(digests.of(big)) and store.has_blob(digests.of(kept))
    assert _leftovers(store.partial_dir) == []
    store.close()


def test_clients_get_an_oci_error_when_the_cache_cannot_hold_a_blob() -> None:
    with FaultyRegistry() as upstream:
        _, (_, small, other, large) = upstream.add_image("acme/app", "1", layer_sizes=[2 * MIB, 2 * MIB + 1, 4 * MIB])
        upstream.slow(digest=small, chunk_size=256 << 10, chunk_delay=0.2)
        with Proxy({"cache": {"max_size": "3MiB"}}, upstream_url=upstream.url) as proxy, httpx.Client() as client:
            too_large = client.get(f"{proxy.url}/v2/acme/app/blobs/{large}", timeout=30)
            assert too_large.status_code == 502
            assert "larger than the whole cache" in too_large.json()["errors"][0]["message"]
            with client.stream("GET", f"{proxy.url}/v2/acme/app/blobs/{small}", timeout=30) as in_flight:
                assert in_flight.status_code == 200
                full = httpx.get(f"{proxy.url}/v2/acme/app/blobs/{other}", timeout=30)
                assert full.status_code == 503 and full.headers["Retry-After"]
                assert full.json()["errors"][0]["code"] == "UNAVAILABLE"
                assert in_flight.read() == upstream.blob(small)
            # Once that download is stored, it is what gets evicted to make room.
            assert client.get(f"{proxy.url}/v2/acme/app/blobs/{other}", timeout=30).content == upstream.blob(other)
            assert len(list((proxy.cache_dir / "content").rglob("*.val"))) == 1
            assert _leftovers(proxy.cache_dir / "partial") == []


# -- 4. nothing left behind ------------------------------------------------------------------


def test_requests_for_many_unknown_digests_leave_no_files_behind() -> None:
    with FaultyRegistry() as upstream:
        _, (_, layer) = upstream.add_image("acme/app", "1", layer_sizes=[MIB])
        with Proxy(upstream_url=upstream.url, args=["--workers", "2"]) as proxy:
            statuses: list[int] = []

            def pull(count: int) -> None:
                with httpx.Client(timeout=30) as client:
                    for _ in range(count):
                        digest = f"sha256:{secrets.token_hex(32)}"
                        statuses.append(client.get(f"{proxy.url}/v2/acme/app/blobs/{digest}").status_code)

            threads = [threading.Thread(target=pull, args=(75,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert httpx.get(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=30).content == upstream.blob(layer)
            assert statuses == [404] * 300
            assert _leftovers(proxy.cache_dir / "partial") == []


def test_start_up_removes_what_crashed_downloads_left() -> None:
    with Proxy(start=False) as proxy:
        partial = proxy.cache_dir / "partial"
        partial.mkdir(parents=True)
        stem = f"sha256-{secrets.token_hex(32)}"
        for suffix in (".lock", ".data", ".json", ".json-new"):
            (partial / f"{stem}{suffix}").write_bytes(b"left by a crash")
        (partial / "import-1-sha256-abc").write_bytes(b"an import staged a moment ago, maybe by another process")
        proxy.start()
        assert _leftovers(partial) == ["import-1-sha256-abc"]


def test_cleaning_up_spares_a_download_another_process_runs(tmp_path: Path) -> None:
    running, crashed = f"sha256-{'1' * 64}", f"sha256-{'2' * 64}"
    for stem in (running, crashed):
        for suffix in (".lock", ".data", ".json"):
            (tmp_path / f"{stem}{suffix}").write_bytes(b"")
    owner = os.open(tmp_path / f"{running}.lock", os.O_RDWR)
    try:
        fcntl.flock(owner, fcntl.LOCK_EX)  # another open file description: as good as another process
        assert flight.remove_abandoned(tmp_path) == 1
        assert _leftovers(tmp_path) == [f"{running}.data", f"{running}.json", f"{running}.lock"]
    finally:
        os.close(owner)


def test_a_follower_that_finds_the_owner_committing_waits_for_the_store_to_have_the_blob(tmp_path: Path) -> None:
    # Another worker's download at its very end: its file renamed into the store, its lock and
    # info file not yet gone, the store's index not yet written. A follower that took "the data
    # file is gone" for "stored" looked in the store too soon, three times in a row (a 503).
    store = DiskContentStore(tmp_path / "cache", 1 << 30)
    data = b"a layer" * 1000
    digest = digests.of(data)
    stem = store.partial_dir / digest.replace(":", "-")
    owner = os.open(stem.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(owner, fcntl.LOCK_EX)  # another open file description: as good as another process
    stem.with_suffix(".json").write_text(json.dumps({"size": len(data)}))

    async def owner_commits() -> None:
        await asyncio.sleep(0.3)
        staged = store.partial_dir / "staged"
        staged.write_bytes(data)
        await asyncio.to_thread(store.put_blob, digest, staged, len(data))
        stem.with_suffix(".json").unlink()
        stem.with_suffix(".lock").unlink()
        os.close(owner)

    async def follow() -> bool:
        async def not_here() -> Source:
            raise AssertionError("the follower fetched")

        committing = asyncio.create_task(owner_commits())
        found = await Downloads(store).read(digest, not_here)
        assert found is None  # the owner stored it: read the store
        stored = store.has_blob(digest)
        await committing
        return stored

    try:
        assert asyncio.run(follow()), "the follower was told the blob is stored before the store had it"
    finally:
        store.close()


def _open_files_naming(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                count += 1
    return count


def test_a_follower_its_last_reader_left_lets_go_of_the_partial_file(tmp_path: Path, blocking: bool) -> None:
    """Else the disk space of a download that then fails stays taken until the digest is asked for again."""
    data = os.urandom(2 * MIB)
    digest = digests.of(data)
    owner_store, follower_store = DiskContentStore(tmp_path, 64 * MIB), DiskContentStore(tmp_path, 64 * MIB)
    data_file = owner_store.partial_dir / f"{digest.replace(':', '-')}.data"

    async def main() -> None:
        gate = asyncio.Event()

        async def broken_opener() -> Source | BlockingSource:
            async def fail() -> None:
                await gate.wait()
                raise DownloadFailed("the upstream broke off")

            return _source(data, len(data), [], fail, blocking=blocking)

        async def unused_opener() -> Source:
            raise AssertionError("a follower does not fetch")

        owner = Downloads(owner_store).join(digest, broken_opener)
        await owner.started
        await _until(lambda: owner._written() >= MIB)
        follower = Downloads(follower_store)
        followed = follower.join(digest, unused_opener)
        reader = DownloadReader(followed)
        await followed.started
        assert await reader.read(0, 1024) == data[:1024]
        reader.close()  # the only reader leaves
        await asyncio.sleep(0.05)
        assert follower.in_flight(digest) is None
        gate.set()
        await _finished(owner)
        assert not data_file.exists()
        assert _open_files_naming(data_file) == 0, "a deleted partial file is still held open"

    asyncio.run(main())


def test_a_follower_does_not_take_a_later_download_for_the_one_it_followed(
    tmp_path: Path, blocking: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner fails; before the follower looks again a second download commits the digest.

    The follower's partial file is the failed one: it must fail, not end cleanly after half the bytes.
    """
    monkeypatch.setattr(flight, "FOLLOW_POLL", 1.0)
    data = os.urandom(2 * MIB)
    digest = digests.of(data)
    stores = [DiskContentStore(tmp_path, 64 * MIB) for _ in range(3)]  # three processes, as it were

    async def main() -> None:
        gate = asyncio.Event()

        async def broken_opener() -> Source | BlockingSource:
            async def fail() -> None:
                await gate.wait()
                raise DownloadFailed("the upstream broke off")

            return _source(data, len(data), [], fail, blocking=blocking)

        async def good_opener() -> Source | BlockingSource:
            return _source(data, len(data), [], blocking=blocking)

        first = Downloads(stores[0]).join(digest, broken_opener)
        await first.started
        await _until(lambda: first._written() >= MIB)
        followed = Downloads(stores[1]).join(digest, good_opener)
        following = asyncio.create_task(_read_all(followed))
        await asyncio.sleep(0.2)  # it has read what there is and waits for its next look
        gate.set()
        await _finished(first)
        second = Downloads(stores[2]).join(digest, good_opener)
        assert await _read_all(second) == (data, None)
        await _finished(second)
        assert stores[2].has_blob(digest)
        body, error = await following
        assert error is not None, f"a clean end after {len(body)} of {len(data)} bytes"

    asyncio.run(main())


def test_every_reader_of_a_follower_gets_the_whole_blob(tmp_path: Path, blocking: bool) -> None:
    """Readers waiting together: the first to see the owner's outcome must not pull the lock from the others."""
    data = os.urandom(2 * MIB)
    digest = digests.of(data)
    owner_store, follower_store = DiskContentStore(tmp_path, 64 * MIB), DiskContentStore(tmp_path, 64 * MIB)

    async def main() -> None:
        gate = asyncio.Event()

        async def slow_opener() -> Source | BlockingSource:
            return _source(data, len(data), [], gate.wait, blocking=blocking)

        async def unused_opener() -> Source:
            raise AssertionError("a follower does not fetch")

        owner = Downloads(owner_store).join(digest, slow_opener)
        await owner.started
        followed = Downloads(follower_store).join(digest, unused_opener)
        readers = [asyncio.create_task(_read_all(followed)) for _ in range(8)]
        await asyncio.sleep(0.2)  # all of them wait for more
        gate.set()
        assert await asyncio.gather(*readers) == [(data, None)] * 8
        await _finished(owner)

    asyncio.run(main())


# -- extents: where a reader's bytes are on disk, for sendfile -----------------------------------


def test_extents_of_a_download_in_flight_name_written_bytes_and_hold_back_the_last_until_commit(
    tmp_path: Path,
    blocking: bool,
) -> None:
    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(4 * MIB)

    async def main() -> None:
        gate = asyncio.Event()

        async def opener() -> Source | BlockingSource:
            return _source(data, len(data), [], gate.wait, blocking=blocking)

        download = Downloads(store).join(digests.of(data), opener)
        reader = DownloadReader(download)
        try:
            await download.started
            fd, count = await reader.extent(0, 1 << 30)
            assert 0 < count < len(data), "an extent past what was written, or the unverified end"
            assert os.pread(fd, count, 0) == data[:count]
            offset = count
            gate.set()
            while True:
                fd, count = await reader.extent(offset, 1 << 30)
                if not count:
                    break
                assert download.committed or offset + count < len(data)
                assert os.pread(fd, count, offset) == data[offset : offset + count]
                offset += count
            assert offset == len(data) and download.committed
            assert await reader.extent(2, 5) == (fd, 5)
        finally:
            reader.close()
        await _finished(download)

    asyncio.run(main())
    assert store.has_blob(digests.of(data))
    store.close()


def test_extents_of_a_failed_download_raise_instead_of_ending(tmp_path: Path, blocking: bool) -> None:
    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(2 * MIB)

    async def main() -> None:
        async def opener() -> Source | BlockingSource:
            return _source(data[:-1] + b"x", len(data), [], blocking=blocking)  # the wrong last byte

        download = Downloads(store).join(digests.of(data), opener)
        reader = DownloadReader(download)
        offset = 0
        try:
            await download.started
            with pytest.raises(DownloadFailed):
                while True:
                    _, count = await reader.extent(offset, 1 << 30)
                    assert count, "a clean end of bytes that do not match the digest"
                    offset += count
        finally:
            reader.close()
        await _finished(download)
        assert offset <= len(data) - 1

    asyncio.run(main())
    store.close()


def test_extents_of_a_follower_in_another_process_reach_the_end_once_the_owner_committed(
    tmp_path: Path, blocking: bool
) -> None:
    data = os.urandom(2 * MIB)
    digest = digests.of(data)
    owner_store, follower_store = DiskContentStore(tmp_path, 64 * MIB), DiskContentStore(tmp_path, 64 * MIB)

    async def main() -> None:
        gate = asyncio.Event()

        async def slow_opener() -> Source | BlockingSource:
            return _source(data, len(data), [], gate.wait, blocking=blocking)

        async def unused_opener() -> Source:
            raise AssertionError("a follower does not fetch")

        owner = Downloads(owner_store).join(digest, slow_opener)
        await owner.started
        followed = Downloads(follower_store).join(digest, unused_opener)
        reader = DownloadReader(followed)
        try:
            await followed.started
            gate.set()
            offset, body = 0, b""
            while True:
                fd, count = await reader.extent(offset, 1 << 30)
                if not count:
                    break
                body += os.pread(fd, count, offset)
                offset += count
            assert body == data
        finally:
            reader.close()
        await _finished(owner)

    asyncio.run(main())


def test_a_download_read_only_through_extents_keeps_no_written_bytes_in_memory(tmp_path: Path, blocking: bool) -> None:
    store = DiskContentStore(tmp_path, max_size=64 * MIB)
    data = os.urandom(4 * MIB)

    async def main() -> None:
        async def opener() -> Source | BlockingSource:
            return _source(data, len(data), [], blocking=blocking)

        download = Downloads(store).join(digests.of(data), opener)
        assert isinstance(download, flight._Fetch)
        reader = DownloadReader(download)
        kept = 0
        try:
            await download.started
            offset = 0
            while True:
                _, count = await reader.extent(offset, 1 << 30)
                kept = max(kept, download._batched)
                if not count:
                    break
                offset += count
        finally:
            reader.close()
        await _finished(download)
        assert kept == 0

    asyncio.run(main())
    store.close()
