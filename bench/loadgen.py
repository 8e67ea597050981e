"""Requests-per-second load: `wrk` when installed, else an asyncio raw-socket client in its own process.

Both keep `connections` keep-alive connections busy for `duration` seconds with one GET
and read every response body completely. wrk checks status codes and counts bytes; the
caller checks one body's digest beforehand and the bytes per response afterwards. The
fallback (`python -m bench.loadgen SPEC_JSON`) also hashes the first body on every
connection and checks every status and length.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LoadSpec:
    url: str  # http://127.0.0.1:PORT
    path: str
    duration: float = 5.0
    connections: int = 16
    headers: dict[str, str] = field(default_factory=dict)
    digest: str | None = None  # the body's sha256 digest, checked by the Python generator
    max_requests: int = 5_000_000  # a bound besides the duration


@dataclass
class LoadResult:
    tool: str
    requests: int
    duration_s: float
    bytes: int
    errors: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def bytes_per_request(self) -> float:
        return self.bytes / self.requests if self.requests else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "wrk (missing)"
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"wrk \S*?(\d+(?:\.\d+)+)", out.stdout + out.stderr)
    return f"wrk {match.group(1)}" if match else "wrk"


_LUA = """
wrk.method = "GET"
wrk.path = {path}
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(spec: LoadSpec, threads: int = 1) -> LoadResult:
    """One wrk run; `threads` event-loop threads (one keeps wrk off the server's core)."""
    path = wrk_path()
    if path is None:
        raise RuntimeError("wrk is not installed")
    headers = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in spec.headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="pp-bench-") as script:
        script.write(_LUA.format(path=json.dumps(spec.path), headers=headers))
        script.flush()
        argv = [
            path,
            f"-t{threads}",
            f"-c{spec.connections}",
            f"-d{max(1, round(spec.duration))}s",
            "--timeout",
            "10s",
            "-s",
            script.name,
            spec.url,
        ]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=spec.duration + 60)
    match = re.search(r"^WRK_JSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    data = json.loads(match.group(1))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        tool=f"{wrk_version()} -t{threads} -c{spec.connections}",
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        detail=data,
    )


def run_python(spec: LoadSpec) -> LoadResult:
    """The asyncio generator in a separate process, so it does not share our GIL."""
    payload = json.dumps(spec.__dict__)
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", payload],
        capture_output=True,
        text=True,
        timeout=spec.duration + 60,
        cwd=REPO_ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"python load generator failed: {out.stderr[-2000:]}")
    data = json.loads(out.stdout)
    return LoadResult(**data)


# --------------------------------------------------------------------------- fallback generator


async def _connection(
    spec: LoadSpec, request: bytes, host: str, port: int, stop_at: float, stats: dict[str, Any], latencies: list[float]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    first = True
    try:
        while time.perf_counter() < stop_at and stats["requests"] < spec.max_requests:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
            if match is None:
                raise RuntimeError("response without Content-Length")
            body = await reader.readexactly(int(match.group(1)))
            latencies.append(time.perf_counter() - started)
            stats["requests"] += 1
            stats["bytes"] += len(head) + len(body)
            if status != 200:
                stats["errors"] += 1
            elif first and spec.digest is not None:
                if "sha256:" + hashlib.sha256(body).hexdigest() != spec.digest:
                    stats["errors"] += 1
                    stats["digest_mismatch"] += 1
                first = False
    finally:
        writer.close()


async def _generate(spec: LoadSpec) -> LoadResult:
    parts = urlsplit(spec.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"GET {spec.path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in spec.headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    stats: dict[str, Any] = {"requests": 0, "bytes": 0, "errors": 0, "digest_mismatch": 0}
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + spec.duration
    tasks = [_connection(spec, request, host, port, stop_at, stats, latencies) for _ in range(spec.connections)]
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), spec.duration + 30)
    elapsed = time.perf_counter() - started
    stats["errors"] += sum(1 for o in outcomes if isinstance(o, BaseException))
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else None

    return LoadResult(
        tool=f"python asyncio raw-socket generator -c{spec.connections}",
        requests=stats["requests"],
        duration_s=elapsed,
        bytes=stats["bytes"],
        errors=stats["errors"],
        p50_ms=pct(0.5),
        p99_ms=pct(0.99),
        detail={"digest_mismatch": stats["digest_mismatch"]},
    )


def main() -> None:
    spec = LoadSpec(**json.loads(sys.argv[1]))
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_generate(spec))
    json.dump(result.__dict__, sys.stdout)


if __name__ == "__main__":
    main()
