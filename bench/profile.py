"""py-spy sampling of the pullproxy process during a scenario, and a per-function summary."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Frames that only say "the event loop / a worker thread is running": not a cost of their own.
_PLUMBING = re.compile(
    r"^(<module>|_run_module_as_main|_run_code|main|run|_run_once|run_forever|run_until_complete|_bootstrap|"
    r"_bootstrap_inner|serve|_serve|__call__|wrapper|worker|_worker|invoke|call_soon|Runner\.run)$"
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pyspy_path() -> str | None:
    return shutil.which("py-spy")


@dataclass
class Profile:
    label: str
    samples: int = 0
    self_counts: Counter[str] = field(default_factory=Counter)  # innermost Python frame (+ C leaf)
    total_counts: Counter[str] = field(default_factory=Counter)  # Python frames anywhere on the stack
    package_self: Counter[str] = field(default_factory=Counter)  # package of the innermost Python frame
    package_total: Counter[str] = field(default_factory=Counter)  # packages anywhere on the stack
    raw_path: Path | None = None
    seconds: float = 0.0
    rate: int = 0

    @property
    def gil_share(self) -> float:
        """Samples taken over samples possible: how busy the interpreter was."""
        return min(1.0, self.samples / (self.rate * self.seconds)) if self.rate and self.seconds else 0.0

    def top(self, counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, 100.0 * count / self.samples) for name, count in counter.most_common(n)] if self.samples else []

    def report(self, n: int = 12) -> str:
        held = f", GIL held {100 * self.gil_share:.0f}% of the time" if self.seconds else ""
        lines = [f"== {self.label}: {self.samples} samples of the thread holding the GIL{held}"]
        lines.append("  self time by package (innermost Python frame):")
        lines.append("    " + ", ".join(f"{name} {pct:.0f}%" for name, pct in self.top(self.package_self, 10)))
        lines.append("  inclusive time by package:")
        lines.append("    " + ", ".join(f"{name} {pct:.0f}%" for name, pct in self.top(self.package_total, 12)))
        lines.append("  self time (innermost Python frame, -> C function it was in, with --profile-native):")
        lines += [f"    {pct:5.1f}%  {name}" for name, pct in self.top(self.self_counts, n)]
        lines.append("  inclusive time (Python frames anywhere on the stack, event-loop plumbing left out):")
        inclusive = Counter({k: v for k, v in self.total_counts.items() if not _PLUMBING.match(k.split(" (")[0])})
        lines += [f"    {pct:5.1f}%  {name}" for name, pct in self.top(inclusive, n)]
        return "\n".join(lines)


def _split(frame: str) -> tuple[str, str]:
    """`func (path/to/file.py:123)` -> (`func`, `file path from the package down`)."""
    m = _FRAME.match(frame)
    if not m:
        return frame, ""
    file = m.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return m.group("func"), file


def _is_python(file: str) -> bool:
    return file.endswith(".py") or file.startswith("<frozen")


def _package(file: str) -> str:
    if file.startswith("<frozen"):
        return "stdlib"
    head = file.split("/", 1)[0]
    if head.endswith(".py"):
        return "stdlib" if head[:-3] in _STDLIB_FILES else head[:-3]
    return head


_STDLIB_FILES = {
    "threading",
    "queue",
    "weakref",
    "typing",
    "enum",
    "functools",
    "contextlib",
    "socket",
    "selectors",
    "ssl",
    "abc",
    "re",
    "copy",
    "dataclasses",
    "os",
    "posixpath",
    "time",
    "uuid",
}


def summarize(raw: Path, label: str) -> Profile:
    prof = Profile(label, raw_path=raw)
    if not raw.exists():
        return prof
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        prof.samples += count
        py = [i for i, (_, file) in enumerate(frames) if _is_python(file)]
        if py:
            func, file = frames[py[-1]]
            key = f"{func} ({file})"
            if py[-1] < len(frames) - 1:
                key += f" -> {frames[-1][0]}"
            package = _package(file)
        else:
            key, package = f"{frames[-1][0]} (C)", "C (event loop)"
        prof.self_counts[key] += count
        prof.package_self[package] += count
        names = {f"{func} ({file})" for func, file in frames if _is_python(file)}
        for name in names:
            prof.total_counts[name] += count
        for pkg in {_package(file) for _, file in frames if _is_python(file)}:
            prof.package_total[pkg] += count
    return prof


class PySpy:
    """`py-spy record --gil` attached to `pid` for the duration of a `with` block (raw collapsed stacks).

    `--gil` keeps only the thread holding the GIL: pullproxy runs Python on one thread at a
    time, so those samples are where its interpreter time goes (threads blocked in `pread`
    or waiting for work are left out). `native` adds C frames (uvloop, httptools, hashlib).
    """

    def __init__(
        self, pid: int, out: Path, label: str, *, subprocesses: bool = False, rate: int = 200, native: bool = False
    ) -> None:
        self.pid = pid
        self.out = out
        self.label = label
        self.subprocesses = subprocesses
        self.rate = rate
        self.native = native
        self.started = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile: Profile | None = None

    def __enter__(self) -> PySpy:
        path = pyspy_path()
        if path is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            path,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--gil",
            "--output",
            str(self.out),
        ]
        if self.subprocesses:
            argv.append("--subprocesses")
        if self.native:
            argv.append("--native")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)  # let it attach before the load starts
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        seconds = time.monotonic() - self.started
        # py-spy writes its output when interrupted like Ctrl-C.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.profile = summarize(self.out, self.label)
        self.profile.seconds, self.profile.rate = seconds, self.rate
        if self.profile.samples:
            self.out.with_suffix(".top.txt").write_text(self.profile.report(25) + "\n")
