"""Bounded connections: request head size and time, connections in total and per client address.

In-process tests run uvicorn's protocols (httptools and the h11 fallback) with the limits on a
real loopback socket; the end-to-end tests run `python -m proxy serve` and flood it.
Client sockets bind to other loopback addresses (127.0.0.2, ...) to act as other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from proxy import config as configuration
from proxy.http import server
from tests.support.proxy import Proxy

PROTOCOLS = {"httptools": server.BoundedHttpToolsProtocol, "h11": server.BoundedH11Protocol}
GET = b"GET / HTTP/1.1\r\nHost: mirror\r\n\r\n"


def limits(**changes: Any) -> server.Limits:
    values: dict[str, Any] = {
        "max_header_size": 16 << 10,
        "header_timeout": 0.3,
        "max_connections": 50,
        "max_connections_per_client": 10,
    }
    return server.Limits(**(values | changes))


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Answers with the number of request body bytes it read."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(protocol: str, bounds: server.Limits) -> AsyncIterator[tuple[int, server.Connections]]:
    """The protocol with `bounds` on 127.0.0.1:<free port>; yields the port and the connection counts."""
    config = uvicorn.Config(
        app, log_level="warning", proxy_headers=False, h11_max_incomplete_event_size=bounds.max_header_size
    )
    config.load()
    protocols = server.Protocols(bounds, PROTOCOLS[protocol])
    state = ServerState()
    listener = await asyncio.get_running_loop().create_server(lambda: protocols(config, state, {}), "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], protocols.connections
    finally:
        listener.close()
        for connection in list(state.connections):
            connection.shutdown()


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return int(lines[0].split()[1]), headers, body


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the server closes the connection within `within` seconds (sending nothing more)."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def request(port: int, source: str = "127.0.0.1", head: bytes = GET) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(port, source)
    try:
        writer.write(head)
        return await response(reader)
    finally:
        writer.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def oci_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


# -- request heads: time ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits()) as (port, connections):
            reader, writer = await connect(port)
            assert not await closed(reader, 0.1)
            assert await closed(reader, 3)
            writer.close()
            await asyncio.sleep(0.05)
            assert connections.open == 0

    run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_trickled_request_head_is_closed_after_header_timeout(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits()) as (port, _):
            reader, writer = await connect(port)
            writer.write(b"GET / HTTP/1.1\r\n")
            started = time.monotonic()
            while time.monotonic() - started < 3:  # a header line every 50 ms, never the end
                writer.write(b"X-Slow: 1\r\n")
                if await closed(reader, 0.05):
                    break
            else:
                pytest.fail("a head trickled for 3 s was not closed (header_timeout 0.3 s)")
            writer.close()

    run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_keep_alive_idles_longer_than_header_timeout_and_times_each_head_from_its_first_byte(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits()) as (port, _):
            reader, writer = await connect(port)
            writer.write(GET)
            assert (await response(reader))[0] == 200
            assert not await closed(reader, 0.6)  # idle keep-alive: uvicorn's keep-alive timeout applies
            writer.write(GET)
            assert (await response(reader))[0] == 200
            writer.write(b"GET / HTTP/1.1\r\nHost: mirror\r\n")  # the next head never ends
            assert await closed(reader, 3)
            writer.close()

    run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_busy_keep_alive_connection_outlives_header_timeout(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits()) as (port, _):
            reader, writer = await connect(port)
            for _ in range(20):  # 1 s in all, each head quick
                writer.write(GET)
                assert (await response(reader))[0] == 200
                await asyncio.sleep(0.05)
            writer.write(GET + GET)  # pipelined
            assert [(await response(reader))[0] for _ in range(2)] == [200, 200]
            writer.close()

    run(scenario())


# -- request heads: size ---------------------------------------------------------------


def big_head(size: int, end: bool = True) -> bytes:
    head = b"GET / HTTP/1.1\r\nHost: mirror\r\nX-Big: " + b"a" * size
    return head + (b"\r\n\r\n" if end else b"")


def test_a_request_head_over_max_header_size_gets_431_and_the_connection_closes() -> None:
    async def scenario() -> None:
        async with serving("httptools", limits()) as (port, connections):
            assert (await request(port, head=big_head(15 << 10)))[0] == 200
            for head in (big_head(17 << 10), big_head(1 << 20, end=False)):
                reader, writer = await connect(port)
                writer.write(head)
                status, headers, body = await response(reader)
                assert (status, headers["connection"], oci_code(body)) == (431, "close", "UNSUPPORTED")
                assert "16 KiB" in json.loads(body)["errors"][0]["message"]
                assert await closed(reader, 3)
                writer.close()
            await asyncio.sleep(0.05)
            assert connections.open == 0

    run(scenario())


def test_the_431_comes_while_a_never_ending_head_is_still_being_sent() -> None:
    async def scenario() -> None:
        async with serving("httptools", limits()) as (port, _):
            reader, writer = await connect(port)
            sent = 0

            async def send() -> None:  # up to 64 MiB of one header line
                nonlocal sent
                writer.write(b"GET / HTTP/1.1\r\nHost: mirror\r\nX-Big: ")
                with contextlib.suppress(ConnectionError):
                    while sent < 64 << 20:
                        writer.write(b"a" * (64 << 10))
                        await writer.drain()
                        await asyncio.sleep(0)
                        sent += 64 << 10

            sending = asyncio.create_task(send())
            try:
                assert (await response(reader, timeout=10))[0] == 431
                assert not sending.done()
            finally:
                sending.cancel()
                writer.close()

    run(scenario())


def test_h11_fallback_refuses_a_request_head_over_max_header_size() -> None:
    async def scenario() -> None:
        async with serving("h11", limits()) as (port, _):
            assert (await request(port, head=big_head(15 << 10)))[0] == 200
            reader, writer = await connect(port)
            writer.write(big_head(1 << 20, end=False))
            # uvicorn's h11 answer, then a close that may reset the connection before it is read
            with contextlib.suppress(ConnectionResetError):
                assert (await response(reader))[0] == 400
            assert await closed(reader, 3)
            writer.close()

    run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_body_does_not_count_as_head(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits()) as (port, _):
            body = b"b" * (256 << 10)
            head = b"POST / HTTP/1.1\r\nHost: mirror\r\nContent-Length: %d\r\n\r\n" % len(body)
            reader, writer = await connect(port)
            writer.write(head + body + GET)
            assert (await response(reader))[::2] == (200, str(len(body)).encode())
            assert (await response(reader))[::2] == (200, b"0")
            writer.close()

    run(scenario())


# -- connections -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_address_over_max_connections_per_client_gets_429_and_others_are_served(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits(header_timeout=10, max_connections_per_client=3)) as (port, _):
            held = [await connect(port, "127.0.0.2") for _ in range(3)]
            reader, writer = await connect(port, "127.0.0.2")
            writer.write(GET)
            status, headers, body = await response(reader)
            assert (status, oci_code(body), headers["retry-after"]) == (429, "TOOMANYREQUESTS", "1")
            assert await closed(reader, 3)
            writer.close()
            assert (await request(port, "127.0.0.3"))[0] == 200
            held.pop()[1].close()
            await asyncio.sleep(0.1)
            assert (await request(port, "127.0.0.2"))[0] == 200
            for _, writer in held:
                writer.close()

    run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connections_over_max_connections_get_503(protocol: str) -> None:
    async def scenario() -> None:
        async with serving(protocol, limits(header_timeout=10, max_connections=3, max_connections_per_client=3)) as (
            port,
            connections,
        ):
            held = [await connect(port, f"127.0.0.{n}") for n in (2, 3, 4)]
            status, headers, body = await request(port, "127.0.0.5")
            assert (status, oci_code(body), headers["retry-after"]) == (503, "UNAVAILABLE", "1")
            assert connections.open == 3
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.1)
            assert connections.open == 0
            assert (await request(port, "127.0.0.5"))[0] == 200

    run(scenario())


def test_a_trusted_proxy_is_not_limited_per_address() -> None:
    async def scenario() -> None:
        bounds = limits(header_timeout=10, max_connections_per_client=2, unlimited=(ipaddress.ip_network("127.0.0.2"),))
        async with serving("httptools", bounds) as (port, _):
            held = [await connect(port, "127.0.0.2") for _ in range(4)]
            assert (await request(port, "127.0.0.2"))[0] == 200
            for _, writer in held:
                writer.close()

    run(scenario())


def test_beyond_the_refusals_being_answered_connections_are_closed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "REFUSING", 2)

    async def scenario() -> None:
        async with serving("httptools", limits(header_timeout=10, max_connections_per_client=1)) as (port, conns):
            held = [await connect(port, "127.0.0.2") for _ in range(3)]  # one served, two being refused
            await asyncio.sleep(0.1)
            assert (conns.open, conns.refusing) == (1, 2)
            reader, writer = await connect(port, "127.0.0.2")
            assert await closed(reader, 0.5)  # no answer: closed at once
            refused_reader, refused_writer = held[1]
            refused_writer.write(GET)
            assert (await response(refused_reader))[0] == 429
            assert await closed(held[2][0], 3)  # sent no head within REFUSAL_TIMEOUT
            for _, held_writer in held:
                held_writer.close()
            writer.close()
            await asyncio.sleep(0.1)
            assert (conns.open, conns.refusing, conns.by_client) == (0, 0, {})

    run(scenario())


def test_ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() -> None:
    assert server.client_key("2001:db8:1:2:aaaa::1") == server.client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert server.client_key("2001:db8:1:3::1") != server.client_key("2001:db8:1:2::1")
    assert server.client_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert server.client_key("10.1.2.3") == "10.1.2.3"


def test_limits_are_shared_among_workers_and_kept_below_the_open_file_limit() -> None:
    loaded = configuration.load(None, environ={})
    assert server.worker_limits(loaded, 1, 1 << 20).max_connections == 1024
    split = server.worker_limits(loaded, 3, 1 << 20)
    assert (split.max_connections, split.max_connections_per_client) == (342, 43)
    low = server.worker_limits(loaded, 1, 1024)  # 1024 - (256 + 32 + 64 for the upstream pool) fds, 2 each
    assert (low.max_connections, low.max_connections_per_client) == (336, 42)
    tiny = server.worker_limits(loaded, 1, 256)
    assert (tiny.max_connections, tiny.max_connections_per_client) == (64, 8)


# -- configuration ---------------------------------------------------------------------


def test_connection_limits_have_defaults_and_take_units(tmp_path: Path) -> None:
    loaded = configuration.load(None, environ={})
    assert (loaded.max_header_size, loaded.header_timeout) == (64 << 10, 10.0)
    assert (loaded.max_connections, loaded.max_connections_per_client) == (1024, 128)
    path = tmp_path / "pullproxy.toml"
    path.write_text('[server]\nmax_header_size = "32KiB"\nheader_timeout = "500ms"\nmax_connections = 10\n')
    loaded = configuration.load(path, environ={"PULLPROXY_SERVER_MAX_CONNECTIONS_PER_CLIENT": "4"})
    assert (loaded.max_header_size, loaded.header_timeout, loaded.max_connections) == (32 << 10, 0.5, 10)
    assert loaded.max_connections_per_client == 4


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('max_header_size = "100B"', "server.max_header_size"),
        ('max_header_size = "lots"', "server.max_header_size"),
        ('header_timeout = "0s"', "server.header_timeout"),
        ('header_timeout = "soon"', "server.header_timeout"),
        ("max_connections = 0", "server.max_connections"),
        ('max_connections = "many"', "server.max_connections"),
        ("max_connections_per_client = true", "server.max_connections_per_client"),
        ("max_connections = 10\nmax_connections_per_client = 11", "server.max_connections_per_client"),
    ],
)
def test_bad_connection_limits_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "pullproxy.toml"
    path.write_text(f"[server]\n{text}\n")
    with pytest.raises(configuration.ConfigError, match=named.replace(".", r"\.")):
        configuration.load(path, environ={})


# -- end to end: `python -m proxy serve` -----------------------------------------------


@pytest.fixture
def bounded_proxy() -> Iterator[Proxy]:
    """A mirror with short limits; its upstream is a closed loopback port (only /v2/ is asked)."""
    config = {
        "server": {
            "header_timeout": "1s",
            "max_header_size": "16KiB",
            "max_connections": 64,
            "max_connections_per_client": 16,
        },
        "upstream": [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}],
    }
    with Proxy(config) as proxy:
        yield proxy


def test_slow_clients_from_one_address_leave_the_mirror_to_others(bounded_proxy: Proxy) -> None:
    """200 sockets from 127.0.0.2 that trickle or never send a head, against a mirror with 160
    file descriptors: 127.0.0.1 is still answered, and every slow socket is closed by the mirror."""
    pid = bounded_proxy.pid
    assert pid is not None
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (160, 160))
    slow = 200

    async def flood() -> None:
        sockets = [await connect(bounded_proxy.port, "127.0.0.2") for _ in range(slow)]
        for _, writer in sockets[::2]:
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
        loop = asyncio.get_running_loop()
        open_at: dict[int, float] = {}
        started = loop.time()

        async def trickle(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while loop.time() - started < 10:
                if index % 2 == 0:
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"X-Slow: 1\r\n")
                if await closed(reader, 0.25):
                    open_at[index] = loop.time() - started
                    return

        trickling = [asyncio.create_task(trickle(i, r, w)) for i, (r, w) in enumerate(sockets)]
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=bounded_proxy.url, timeout=5) as client:
            for _ in range(5):
                others = await client.get("/v2/", headers={"Connection": "close"})
                assert others.status_code == 200
        await asyncio.gather(*trickling)
        for _, writer in sockets:
            writer.close()
        assert len(open_at) == slow, f"{slow - len(open_at)} slow sockets still open after 10 s (header_timeout 1 s)"

    run(flood())
    assert httpx.get(f"{bounded_proxy.url}/v2/", timeout=5).status_code == 200
    log = bounded_proxy.log_text()
    assert "connections refused or closed by the limits" in log


def test_an_oversized_request_head_gets_431_from_the_mirror(bounded_proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", bounded_proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Big: " + b"a" * (12 << 10) + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", bounded_proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Big: " + b"a" * (1 << 20))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert oci_code(body) == "UNSUPPORTED"


def test_serve_raises_the_soft_open_file_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # inherited by the mirror
    try:
        proxy = Proxy({"upstream": [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}]})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with proxy:
        assert proxy.pid is not None
        limits_now = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
        assert limits_now[0] > 512
        assert limits_now[0] == limits_now[1] or hard == resource.RLIM_INFINITY
