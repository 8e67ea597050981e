"""Loopback port and readiness helpers shared by every test harness."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """Return a TCP port the OS just handed out on 127.0.0.1.

    Asking the kernel (bind to port 0) avoids hard-coded ports colliding between
    parallel runs; the tiny race until the server binds it is acceptable here.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str,
    timeout: float = 15.0,
    *,
    ok_status: tuple[int, ...] = (200, 401),
    alive: Callable[[], bool] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.Response:
    """Poll ``url`` with GET until it answers with one of ``ok_status``.

    Servers are started as subprocesses, so readiness means "answers HTTP",
    not "process exists". ``alive`` may be a callable returning False once the
    server process died, which turns a long wait into an immediate failure.
    ``verify`` is httpx's: an ``ssl.SSLContext`` trusting a test CA for an HTTPS server.
    """
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"process serving {url} exited before it became ready ({last})")
        try:
            resp = httpx.get(url, timeout=2.0, verify=verify)
            if resp.status_code in ok_status:
                return resp
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f}s ({last})")
        time.sleep(0.05)
