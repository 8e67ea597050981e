"""Subprocess lifecycle shared by the registry, proxy and containerd harnesses.

Every server a test starts must die with the test session, even when a test
errors or pytest is interrupted, so each one is stopped in ``finally`` blocks
and additionally registered with an ``atexit`` backstop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

_LIVE: set[subprocess.Popen[bytes]] = set()


class Closing:
    """A context manager that calls `close()` on exit: the servers and clients tests start."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log_path`` and track it.

    A new session keeps terminal signals (Ctrl-C on pytest) from racing our own
    orderly shutdown; the atexit hook still reaches it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    _LIVE.add(proc)
    return proc


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL the whole process group."""
    if proc is None:
        return
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
    finally:
        _LIVE.discard(proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group we created (start_new_session) and the leader."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        stop(proc, timeout=5)
