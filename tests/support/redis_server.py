"""Debian's `redis-server` on 127.0.0.1:<free port>, data in a temp folder (no persistence unless asked)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port
from .procs import Closing, spawn, stop, tail

REDIS_BIN = "/usr/bin/redis-server"


class RedisServer(Closing):
    """One redis-server; the port survives `stop()`/`start()`, so outages can be tested."""

    def __init__(self, *, start: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pp-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def coordination_toml(self, **extra: str) -> str:
        """A `[coordination]` table for this server."""
        lines = ["[coordination]", f'redis = "{self.url}"', *(f'{key} = "{value}"' for key, value in extra.items())]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.running:
            return self
        argv = [
            REDIS_BIN,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        self._proc = spawn(argv, self.log_path)
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"redis-server exited\n{tail(self.log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server not ready after {timeout:.0f}s\n{tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop(self._proc, timeout=5)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"RedisServer({self.url})"
