"""Concurrent blob GETs over raw sockets, run as its own process: `python -m bench.client SPEC_JSON`.

Each client is a thread with a blocking socket: `recv_into` and sha256 of large buffers
both release the GIL, so the clients spread over the cores like separate programs would,
and no HTTP library sits between the socket and the measurement. All clients connect
first, then a barrier releases every request at the same instant (`t0`). Each body is
read completely and hashed; the result says per client whether it matched the digest.

Prints one JSON object on stdout:
`{"wall_s", "clients": [{"status", "bytes", "ok", "first_byte_s", "first_body_s", "total_s", "error"}]}`
where the times are seconds since `t0`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

BUF = 1 << 20
MAX_HEADER = 64 << 10


@dataclass
class Spec:
    url: str  # http://127.0.0.1:PORT
    path: str
    digest: str  # sha256:<hex> the body must hash to
    clients: int = 1
    size: int | None = None  # expected body size, if known
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 300.0  # per client, whole request


@dataclass
class Result:
    status: int = 0
    bytes: int = 0
    ok: bool = False
    first_byte_s: float | None = None
    first_body_s: float | None = None
    total_s: float | None = None
    error: str | None = None


class _Conn:
    """A socket with a small pushback buffer, for headers and chunked bodies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def some(self, limit: int = BUF) -> bytes:
        if self.pending:
            data, self.pending = self.pending[:limit], self.pending[limit:]
            return data
        return self.sock.recv(limit)

    def readline(self) -> bytes:
        while b"\n" not in self.pending:
            data = self.sock.recv(BUF)
            if not data:
                raise ConnectionError("connection closed inside a chunked body")
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\n")
        return line


def _request(spec: Spec, host: str) -> bytes:
    lines = [f"GET {spec.path} HTTP/1.1", f"Host: {host}", "User-Agent: pullproxy-bench", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in spec.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _fetch(sock: socket.socket, spec: Spec, request: bytes, t0: float, res: Result) -> None:
    sock.sendall(request)
    conn = _Conn(sock)
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(BUF)
        if not data:
            raise ConnectionError(f"connection closed before the headers ({len(head)} bytes)")
        if res.first_byte_s is None:
            res.first_byte_s = time.perf_counter() - t0
        head += data
        if len(head) > MAX_HEADER and b"\r\n\r\n" not in head:
            raise ValueError("response headers too large")
    head, _, conn.pending = head.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    res.status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    hasher = hashlib.sha256()

    def body(data: bytes | memoryview) -> None:
        if data and res.first_body_s is None:
            res.first_body_s = time.perf_counter() - t0
        hasher.update(data)
        res.bytes += len(data)

    if "content-length" in headers:
        length = int(headers["content-length"])
        body(conn.pending[:length])
        conn.pending = b""
        buf = bytearray(BUF)
        view = memoryview(buf)
        while res.bytes < length:
            n = sock.recv_into(view, min(BUF, length - res.bytes))
            if n == 0:
                raise ConnectionError(f"connection closed after {res.bytes} of {length} body bytes")
            body(view[:n])
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int(conn.readline().split(b";")[0].strip(), 16)
            if size == 0:
                break
            left = size
            while left:
                data = conn.some(min(left, BUF))
                if not data:
                    raise ConnectionError("connection closed inside a chunk")
                body(data)
                left -= len(data)
            conn.readline()
    else:
        while data := conn.some():
            body(data)
    res.total_s = time.perf_counter() - t0
    digest = "sha256:" + hasher.hexdigest()
    size_ok = spec.size is None or res.bytes == spec.size
    res.ok = res.status == 200 and digest == spec.digest and size_ok
    if not res.ok and res.error is None:
        res.error = f"HTTP {res.status}, {res.bytes} bytes hashing to {digest[:19]}..."


def run(spec: Spec) -> dict[str, Any]:
    parts = urlsplit(spec.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = _request(spec, f"{host}:{port}")
    results = [Result() for _ in range(spec.clients)]
    t0_box: list[float] = []
    barrier = threading.Barrier(spec.clients, action=lambda: t0_box.append(time.perf_counter()))

    def client(i: int) -> None:
        res = results[i]
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=spec.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            res.error = f"connect: {exc}"
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            res.error = res.error or "barrier broken"
        if sock is None or not t0_box:
            return
        try:
            _fetch(sock, spec, request, t0_box[0], res)
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            sock.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(spec.clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + spec.timeout + 65
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    for res, t in zip(results, threads, strict=True):
        if t.is_alive():
            res.error = "client did not finish in time"
    totals = [r.total_s for r in results if r.total_s is not None]
    return {"wall_s": max(totals) if totals else None, "clients": [asdict(r) for r in results]}


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    json.dump(run(spec), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
