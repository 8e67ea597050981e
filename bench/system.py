"""Linux process facts the benchmark needs: process trees, RSS, listening sockets, access logs."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process visible now."""
    tree: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (uvicorn's worker processes included)."""
    tree = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(root: int) -> int:
    """Current resident set of the process tree, bytes."""
    return sum(_status_kib(pid, "VmRSS") for pid in process_tree(root)) * 1024


def reset_peak_rss(root: int) -> bool:
    """Reset VmHWM of every process in the tree (Linux >= 4.0: write 5 to clear_refs)."""
    ok = True
    for pid in process_tree(root):
        try:
            (_PROC / str(pid) / "clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def tree_peak_rss(root: int) -> int:
    """Sum of VmHWM over the tree, bytes: exact for one process, an upper bound for several."""
    return sum(_status_kib(pid, "VmHWM") for pid in process_tree(root)) * 1024


class RssSampler:
    """Polls the tree's RSS every `interval` seconds in a thread and keeps the maximum.

    Also resets and reads VmHWM, which catches peaks shorter than the polling interval.
    The loop is bounded by `max_seconds` so a forgotten sampler cannot run forever.
    """

    def __init__(self, root: int, interval: float = 0.02, max_seconds: float = 600.0) -> None:
        self.root = root
        self.interval = interval
        self.max_seconds = max_seconds
        self.sampled_peak = 0
        self.hwm_peak = 0
        self.hwm_ok = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.hwm_ok = reset_peak_rss(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sampled_peak = max(self.sampled_peak, tree_rss(self.root))
        self.hwm_peak = tree_peak_rss(self.root) if self.hwm_ok else 0

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sampled_peak = max(self.sampled_peak, tree_rss(self.root))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        """Best estimate: VmHWM when it could be reset, else the sampled maximum."""
        return self.hwm_peak if self.hwm_ok and self.hwm_peak else self.sampled_peak


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds consumed so far by the live processes of the tree."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def foreign_cpu_snapshot() -> dict[tuple[int, int], float]:
    """CPU seconds of every user-space process outside this one's tree, reaped children included.

    Keyed by (pid, start time) so a reused pid is a new process. Kernel threads are left
    out: they also do this benchmark's loopback traffic and disk writeback.
    """
    tick = os.sysconf("SC_CLK_TCK")
    ours = set(process_tree(os.getpid()))
    snap: dict[tuple[int, int], float] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == 2 or ppid == 2:  # kthreadd and kernel threads
            continue
        # utime stime cutime cstime, and starttime
        snap[(pid, int(fields[19]))] = sum(int(v) for v in fields[11:15]) / tick
    return snap


def foreign_cpu_between(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float]) -> float:
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


def pid_listening_on(port: int) -> int | None:
    """The (lowest) pid holding a TCP socket that listens on 127.0.0.1:`port` or any address."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    found: list[int] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        found.append(int(entry.name))
                        break
    return min(found) if found else None


# --------------------------------------------------------------------------- access log

# distribution's access log is Apache combined format, one line per finished request.
_ACCESS = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) (?P<size>\d+|-)'
)


@dataclass(frozen=True, slots=True)
class AccessEntry:
    method: str
    path: str
    status: int
    size: int


def read_access_log(path: Path, offset: int = 0) -> tuple[list[AccessEntry], int]:
    """Access-log entries written after byte `offset`, and the new offset (whole lines only)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    entries = []
    for line in data[:end].decode(errors="replace").splitlines():
        m = _ACCESS.match(line)
        if m:
            size = m.group("size")
            entries.append(
                AccessEntry(
                    m.group("method"), m.group("path"), int(m.group("status")), int(size) if size.isdigit() else 0
                )
            )
    return entries, offset + end


def blob_gets(entries: list[AccessEntry], digest: str) -> list[AccessEntry]:
    return [e for e in entries if e.method == "GET" and e.path.split("?", 1)[0].endswith(f"/blobs/{digest}")]
