"""Debian's HAProxy (`/usr/sbin/haproxy`) in http mode, round-robin over the given backends.

A fleet of replicas is reached through a load balancer in production; the tests put the same
in front of theirs, so clients see one address and every request may land on another replica.
The config lives in a temp folder; haproxy runs in the foreground (`-db`) and logs one line per
request to stdout (our log file) naming the server that answered, and a stats socket there
tells how many responses each server gave. Health checks (`GET /v2/` every 300 ms) take a
dead backend out of the rotation; until then a refused connection is retried on another one.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .ports import free_port, wait_http
from .procs import Closing, spawn, stop, tail

HAPROXY_BIN = "/usr/sbin/haproxy"
_URL = re.compile(r"^http://(?P<host>[^/:]+):(?P<port>\d+)/?$")
#: One line per request: a marker, the server, status, bytes sent, method and path (%HPO: path only).
_LOG_FORMAT = "PPREQ %s %ST %B %HM %HPO"
_LINE = re.compile(r"PPREQ (?P<server>\S+) (?P<status>-?\d+) (?P<bytes>\d+) (?P<method>\S+) (?P<path>\S+)")


class Served(NamedTuple):
    """One request as haproxy logged it when it ended."""

    server: str  # the backend's name: r0, r1, … in the order given; <NOSRV> if none was chosen
    status: int  # -1: the connection ended before a status (an aborted transfer)
    bytes: int
    method: str
    path: str


class HAProxy(Closing):
    """haproxy on 127.0.0.1:<free port> in front of ``backends`` (``http://127.0.0.1:PORT`` URLs).

    Servers are named ``r0``, ``r1``, … in order. ``health_checks`` takes a backend that stops
    answering out of the rotation within about a second (and back in once it answers); without
    them a dead one is only skipped by the retry on a refused connection.
    """

    def __init__(self, backends: Sequence[str], *, health_checks: bool = True, start: bool = True) -> None:
        if not backends:
            raise ValueError("haproxy needs at least one backend")
        self.backends = [self._address(url) for url in backends]
        self.names = [f"r{i}" for i in range(len(self.backends))]
        self.health_checks = health_checks
        self.dir = Path(tempfile.mkdtemp(prefix="pp-haproxy-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.config_path = self.dir / "haproxy.cfg"
        self.log_path = self.dir / "haproxy.log"
        self.stats_socket = self.dir / "stats.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.write_config()
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _address(url: str) -> str:
        match = _URL.match(url)
        if match is None:
            raise ValueError(f"backend {url!r}: expected http://HOST:PORT")
        return f"{match['host']}:{match['port']}"

    def write_config(self) -> None:
        check = " check inter 300ms fastinter 100ms downinter 300ms fall 2 rise 1" if self.health_checks else ""
        servers = "\n".join(
            f"    server {name} {address}{check}" for name, address in zip(self.names, self.backends, strict=True)
        )
        self.config_path.write_text(
            f"""global
    maxconn 4096
    log stdout format raw local0 info
    stats socket {self.stats_socket} mode 600 level admin
    stats timeout 10s

defaults
    mode http
    log global
    log-format "{_LOG_FORMAT}"
    option dontlognull
    option redispatch
    retries 3
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s
    timeout queue 30s

frontend registry
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v2/
    http-check expect status 200,401
{servers}
"""
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> HAProxy:
        """Start (or restart) on the same port; wait until the config checks and the frontend answers."""
        if self.running:
            return self
        check = subprocess.run(
            [HAPROXY_BIN, "-c", "-f", str(self.config_path)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config rejected:\n{check.stdout}{check.stderr}")
        self._proc = spawn([HAPROXY_BIN, "-db", "-f", str(self.config_path)], self.log_path)
        try:
            # Any HTTP answer proves the frontend is bound (503 while no backend is up yet).
            wait_http(f"{self.url}/v2/", timeout, ok_status=(200, 401, 503), alive=lambda: self.running)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"haproxy failed to start: {exc}\n{tail(self.log_path)}") from exc
        return self

    def stop(self) -> None:
        stop(self._proc, timeout=5)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ what it did

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``disable server replicas/r0``, …)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name → column → value (``status``, ``stot``, ``hrsp_2xx``…)."""
        lines = [line for line in self.command("show stat").splitlines() if line.strip()]
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","), strict=False)) for line in lines[1:])
        return {row["svname"]: row for row in rows if row.get("pxname") == "replicas" and row["svname"] in self.names}

    def status(self) -> dict[str, str]:
        """Each server's health as haproxy sees it: ``UP``, ``DOWN``, ``no check``…"""
        return {name: row["status"] for name, row in self.server_stats().items()}

    def wait_status(self, name: str, wanted: str, timeout: float = 15.0) -> None:
        """Wait until server ``name`` is ``wanted`` (``UP``/``DOWN``) by haproxy's checks."""
        deadline = time.monotonic() + timeout
        while (now := self.status().get(name, "")).split(" ")[0] != wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy server {name} is {now!r}, not {wanted} after {timeout:.0f}s")
            time.sleep(0.1)

    def requests(self) -> list[Served]:
        """Every request logged since start (or ``reset_log()``), in the order they ended."""
        text = self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
        out = []
        for match in _LINE.finditer(text):
            out.append(
                Served(match["server"], int(match["status"]), int(match["bytes"]), match["method"], match["path"])
            )
        return out

    def served_by(self, path_contains: str = "", method: str | None = None) -> Counter[str]:
        """Requests per server whose path contains ``path_contains`` (and with ``method``)."""
        return Counter(
            r.server
            for r in self.requests()
            if path_contains in r.path and (method is None or r.method == method.upper())
        )

    def reset_log(self) -> None:
        """Count requests from here on only."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def __repr__(self) -> str:
        return f"HAProxy({self.url} → {', '.join(self.backends)})"
