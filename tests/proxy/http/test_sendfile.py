"""The ASGI zero-copy send on uvicorn's httptools protocol: exact bytes, in order, and never a clean
end of a short body.

In-process: the bounded protocol of `proxy.http.server` serves small ASGI apps on a real loopback
socket, under asyncio's loop and under uvloop (which uvicorn picks, and which has no
`loop.sendfile`); `os.sendfile` is wrapped to count the bytes that went through it. Then
`python -m proxy serve` against the fault-injecting upstream: cold followers, warm clients and
ranges get the exact bytes, and a failed download never ends cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from uvicorn.server import ServerState

from cache.readers import FileReader
from proxy.http import sendfile, server
from proxy.http.responses import BlobResponse
from proxy.http.sendfile import ZEROCOPY
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

MIB = 1 << 20
LOOPS = ("asyncio", "uvloop")

App = Callable[[dict[str, Any], Callable[..., Any], Callable[..., Any]], Coroutine[Any, Any, None]]


def limits() -> server.Limits:
    return server.Limits(
        max_header_size=16 << 10, header_timeout=5.0, max_connections=50, max_connections_per_client=50
    )


def run(loop: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
    bounded = asyncio.wait_for(coroutine, 30)
    return uvloop.run(bounded) if loop == "uvloop" else asyncio.run(bounded)


@pytest.fixture
def sent_by_sendfile(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The byte counts os.sendfile returned, call by call."""
    counts: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        counts.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting)
    yield counts


@contextlib.asynccontextmanager
async def serving(app: App, protocol: type[Any] | None = None, state: ServerState | None = None) -> AsyncIterator[int]:
    config = uvicorn.Config(app, log_level="error", proxy_headers=False, lifespan="off")
    config.load()
    protocols = server.Protocols(limits(), protocol or server.BoundedHttpToolsProtocol)
    state = state or ServerState()
    listener = await asyncio.get_running_loop().create_server(lambda: protocols(config, state, {}), "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        for connection in list(state.connections):
            connection.shutdown()
        for task in list(state.tasks):
            task.cancel()


async def get(port: int, path: str = "/", slow: float = 0.0) -> tuple[dict[str, str], bytes, bool]:
    """Headers, body (to Content-Length, or to the end of the chunks, or to EOF) and whether it ended cleanly."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if slow:
            await asyncio.sleep(slow)
        if "content-length" in headers:
            length = int(headers["content-length"])
            body = bytearray()
            while len(body) < length:
                chunk = await reader.read(length - len(body))
                if not chunk:
                    return headers, bytes(body), False
                body += chunk
            return headers, bytes(body), True
        body = bytearray()
        while True:  # chunked
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return headers, bytes(body), True
            body += chunk[:-2]
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return headers, bytes(body), False
    finally:
        writer.close()


def data_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


async def start(send: Callable[..., Any], length: int | None) -> None:
    headers = [] if length is None else [(b"content-length", b"%d" % length)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


@pytest.mark.parametrize("loop", LOOPS)
def test_zerocopysend_sends_exactly_the_ranges_asked_for_through_sendfile(
    loop: str, tmp_path: Path, sent_by_sendfile: list[int]
) -> None:
    path, data = data_file(tmp_path, 8 * MIB)
    parts = [(5, 3 * MIB), (4 * MIB, 2 * MIB + 7), (8 * MIB - 1, 1)]

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        assert ZEROCOPY in scope["extensions"]
        await start(send, sum(count for _, count in parts))
        with path.open("rb") as file:
            for offset, count in parts:
                await send({"type": ZEROCOPY, "file": file, "offset": offset, "count": count, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def main() -> list[tuple[dict[str, str], bytes, bool]]:
        async with serving(app) as port:
            return [await get(port), await get(port)]

    expected = b"".join(data[offset : offset + count] for offset, count in parts)
    for _, body, clean in run(loop, main()):
        assert clean and body == expected
    assert sum(sent_by_sendfile) == 2 * len(expected)


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_the_transport_still_holds_go_out_before_the_file_bytes(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body written the usual way that the socket could not take at once stays first (the client
    reads only after a pause, so the transport's buffer is full when the zero-copy send comes):
    no sendfile call is made while the transport holds bytes."""
    cycles: list[sendfile.ZeroCopyCycle] = []
    held: list[int] = []  # the transport's buffered bytes at each sendfile call
    real_send, real_sendfile = sendfile.ZeroCopyCycle.send, os.sendfile

    async def recording(self: sendfile.ZeroCopyCycle, message: Any) -> None:
        cycles.append(self)
        await real_send(self, message)

    def checking(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        held.append(cycles[-1].transport.get_write_buffer_size())
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(sendfile.ZeroCopyCycle, "send", recording)
    monkeypatch.setattr(os, "sendfile", checking)
    path, data = data_file(tmp_path, 4 * MIB)
    before = os.urandom(16 * MIB)

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await start(send, len(before) + len(data))
        await send({"type": "http.response.body", "body": before, "more_body": True})
        await send({"type": ZEROCOPY, "file": path.open("rb"), "offset": 0, "count": len(data), "more_body": False})

    async def main() -> tuple[dict[str, str], bytes, bool]:
        async with serving(app) as port:
            return await get(port, slow=0.5)

    _, body, clean = run(loop, main())
    assert clean and body == before + data
    assert held and set(held) == {0}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_file_shorter_than_the_count_breaks_the_connection_instead_of_ending_cleanly(
    loop: str, tmp_path: Path
) -> None:
    path, data = data_file(tmp_path, MIB)
    failures: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await start(send, len(data) + 10)
        try:
            with path.open("rb") as file:
                await send({"type": ZEROCOPY, "file": file, "offset": 0, "count": len(data) + 10, "more_body": False})
        except BaseException as exc:
            failures.append(exc)
            raise

    async def main() -> tuple[dict[str, str], bytes, bool]:
        async with serving(app) as port:
            return await get(port)

    _, body, clean = run(loop, main())
    assert not clean and body == data
    assert len(failures) == 1 and isinstance(failures[0], EOFError)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_count_beyond_content_length_is_refused_before_a_byte_is_sent(loop: str, tmp_path: Path) -> None:
    path, _ = data_file(tmp_path, MIB)

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await start(send, 100)
        await send({"type": ZEROCOPY, "file": path.open("rb"), "offset": 0, "count": 101, "more_body": False})

    async def main() -> tuple[dict[str, str], bytes, bool]:
        async with serving(app) as port:
            return await get(port)

    _, body, clean = run(loop, main())
    assert not clean and body == b""


@pytest.mark.parametrize("loop", LOOPS)
def test_without_content_length_the_file_bytes_are_one_chunk_each(loop: str, tmp_path: Path) -> None:
    path, data = data_file(tmp_path, 2 * MIB)

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await start(send, None)
        fd = os.open(path, os.O_RDONLY)  # a bare descriptor does as well as a file object
        try:
            await send({"type": "http.response.body", "body": b"head", "more_body": True})
            await send({"type": ZEROCOPY, "file": fd, "offset": 0, "count": MIB, "more_body": True})
            await send({"type": ZEROCOPY, "file": fd, "offset": MIB, "count": MIB, "more_body": False})
        finally:
            os.close(fd)

    async def main() -> tuple[dict[str, str], bytes, bool]:
        async with serving(app) as port:
            return await get(port)

    headers, body, clean = run(loop, main())
    assert headers["transfer-encoding"] == "chunked"
    assert clean and body == b"head" + data


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_leaves_mid_sendfile_ends_the_send_and_leaves_no_descriptor(loop: str, tmp_path: Path) -> None:
    path = tmp_path / "big"
    with path.open("wb") as file:
        file.truncate(256 * MIB)  # sparse: sendfile reads zeros, quickly
    ended: list[BaseException | None] = []

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await start(send, 256 * MIB)
        try:
            with path.open("rb") as file:
                await send({"type": ZEROCOPY, "file": file, "offset": 0, "count": 256 * MIB, "more_body": False})
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)

    async def main() -> None:
        async with serving(app) as port:
            before = open_descriptors()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: mirror\r\n\r\n")
            await reader.readexactly(MIB)  # the server is sending; then the socket buffer fills up
            await asyncio.sleep(0.2)
            writer.transport.abort()  # a reset, with the server waiting for room in the socket
            for _ in range(500):
                if ended:
                    break
                await asyncio.sleep(0.01)
            assert ended, "the send went on after the client left"
            await asyncio.sleep(0.05)
            assert open_descriptors() <= before

    run(loop, main())
    assert isinstance(ended[0], OSError) or ended[0] is None


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_closed_by_the_server_ends_a_sendfile_waiting_for_a_client_that_reads_no_more(
    loop: str, tmp_path: Path
) -> None:
    """The sendfile writes to a duplicate of the socket, which keeps it open: the wait must end
    when the transport closes, not when the client someday reads again."""
    path = tmp_path / "big"
    with path.open("wb") as file:
        file.truncate(256 * MIB)
    ended: list[BaseException | None] = []
    state = ServerState()

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await start(send, 256 * MIB)
        try:
            with path.open("rb") as file:
                await send({"type": ZEROCOPY, "file": file, "offset": 0, "count": 256 * MIB, "more_body": False})
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)

    async def main() -> None:
        async with serving(app, state=state) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: mirror\r\n\r\n")
                await reader.readexactly(MIB)
                await asyncio.sleep(0.3)  # the socket buffers fill up; the sendfile waits
                assert not ended
                for connection in list(state.connections):
                    connection.transport.close()
                for _ in range(300):
                    if ended:
                        break
                    await asyncio.sleep(0.01)
                assert ended and isinstance(ended[0], ConnectionError)
            finally:
                writer.close()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_the_extension_is_offered_by_httptools_over_plain_tcp_only(loop: str) -> None:
    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        body = b"yes" if ZEROCOPY in scope.get("extensions", {}) else b"no"
        await start(send, len(body))
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def main() -> list[bytes]:
        found = []
        for protocol in (server.BoundedHttpToolsProtocol, server.BoundedH11Protocol):
            async with serving(app, protocol) as port:
                found.append((await get(port))[1])
        return found

    assert run(loop, main()) == [b"yes", b"no"]
    assert not issubclass(server.BoundedH11Protocol, sendfile.ZeroCopyCycle)


# -- BlobResponse: the cached file goes out with sendfile, ranges too --------------------------


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_a_cached_blob_and_its_ranges_are_sent_from_the_file_where_the_server_offers_it(
    protocol: str, tmp_path: Path, sent_by_sendfile: list[int]
) -> None:
    path, data = data_file(tmp_path, 3 * MIB + 5)

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        ranges = {"/": None, "/range": (MIB + 1, 2 * MIB + 2)}
        reader = FileReader(os.open(path, os.O_RDONLY), len(data))
        await BlobResponse(reader, len(data), {}, ranges[scope["path"]])(scope, receive, send)

    async def main() -> list[tuple[dict[str, str], bytes, bool]]:
        chosen = server.BoundedHttpToolsProtocol if protocol == "httptools" else server.BoundedH11Protocol
        async with serving(app, chosen) as port:
            return [await get(port), await get(port, "/range")]

    (_, whole, clean), (headers, part, part_clean) = uvloop.run(asyncio.wait_for(main(), 30))
    assert clean and whole == data
    assert part_clean and part == data[MIB + 1 : 2 * MIB + 3]
    assert headers["content-range"] == f"bytes {MIB + 1}-{2 * MIB + 2}/{len(data)}"
    assert sum(sent_by_sendfile) == (len(whole) + len(part) if protocol == "httptools" else 0)


# -- the mirror: cached blobs, and followers of a download in flight --------------------------


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str | None]:
    """Status, body, and why the body ended early (None: it ended cleanly)."""
    body = bytearray()
    try:
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            for chunk in response.iter_raw():
                body += chunk
            return response.status_code, bytes(body), None
    except httpx.HTTPError as exc:
        return 0, bytes(body), repr(exc)


def test_followers_of_a_download_in_flight_and_later_clients_get_the_exact_bytes(
    proxy: Proxy, faulty: FaultyRegistry
) -> None:
    _, (_, layer) = faulty.add_image("acme/zerocopy", "v1", layer_sizes=[3 * MIB + 3])
    data = faulty.blob(layer)
    faulty.slow(digest=layer, times=1, chunk_size=64 << 10, bytes_per_sec=6 * MIB)  # about half a second
    url = f"{proxy.url}/v2/acme/zerocopy/blobs/{layer}"
    ranged = {"Range": f"bytes={MIB}-{2 * MIB}"}
    with ThreadPoolExecutor(6) as pool:
        cold = list(pool.map(lambda headers: fetch(url, headers), [None] * 5 + [ranged]))
    assert cold[:5] == [(200, data, None)] * 5
    assert cold[5] == (206, data[MIB : 2 * MIB + 1], None)
    blob_gets = [r for r in faulty.requests() if r.method == "GET" and r.path.endswith(layer)]
    assert len([r for r in blob_gets if "range" not in r.headers]) == 1  # one download for everyone
    assert len(blob_gets) <= 2  # and at most one upstream range request, for bytes not written yet
    assert fetch(url) == (200, data, None)
    assert fetch(url, ranged) == (206, data[MIB : 2 * MIB + 1], None)
    assert fetch(url, {"Range": "bytes=-1"}) == (206, data[-1:], None)


def test_followers_of_a_download_that_fails_see_a_broken_body_not_a_clean_end(
    proxy: Proxy, faulty: FaultyRegistry
) -> None:
    _, (_, layer) = faulty.add_image("acme/zerocopy-bad", "v1", layer_sizes=[2 * MIB])
    faulty.slow(digest=layer, times=1, chunk_size=64 << 10, bytes_per_sec=8 * MIB)
    faulty.truncate(layer, keep=MIB, times=1)
    url = f"{proxy.url}/v2/acme/zerocopy-bad/blobs/{layer}"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: fetch(url), range(3)))
    for _, body, broken in results:
        assert broken is not None, f"a clean end after {len(body)} bytes"
        assert len(body) < 2 * MIB
