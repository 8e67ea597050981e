"""Whose turn it is to refresh the pins, among the server's workers and commands sharing a cache.

One flock'd file: its holder runs a round; its content records when the last round began
and for which pin list, so a restart with new `[[pin]]`s refreshes at once, while a
restart with the same ones waits for the interval.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


class PinLock:
    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.path = directory / "pins.lock"
        self.fingerprint = fingerprint
        self._fd = -1

    def acquire(self, interval: float | None = None) -> bool:
        """Blocking. With `interval`: only if no one else holds it and a round is due. Without: waits for it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if interval is not None else 0))
        except BlockingIOError:
            os.close(fd)
            return False
        if interval is not None and not self._due(fd, interval):
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{time.time()} {self.fingerprint}".encode(), 0)
        self._fd = fd
        return True

    def _due(self, fd: int, interval: float) -> bool:
        began, _, fingerprint = os.pread(fd, 256, 0).decode(errors="replace").partition(" ")
        try:
            return fingerprint != self.fingerprint or time.time() - float(began) >= interval
        except ValueError:  # never ran
            return True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
