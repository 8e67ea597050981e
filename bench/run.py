"""pullproxy against CNCF distribution 2.8 in proxy mode (the anchor), on one seeded upstream.

`python -m bench.run [--quick] [--scenarios cold-herd,cold-single,cold-range,warm,rps] [--json FILE]`.
See bench/README.md for what each scenario measures and how.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench import client as blob_client
from bench import loadgen, profile
from bench.fleet import FleetBench
from bench.system import (
    AccessEntry,
    RssSampler,
    blob_gets,
    foreign_cpu_between,
    foreign_cpu_snapshot,
    pid_listening_on,
    read_access_log,
    tree_cpu_seconds,
    tree_rss,
)
from tests.support.images import MANIFEST_ACCEPT, Blob, PushedImage, Pusher, push_oci_image
from tests.support.proxy import Proxy
from tests.support.registry import REGISTRY_BIN, Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SCENARIOS = ("cold-herd", "cold-single", "cold-range", "warm", "rps")
FLEET_SCENARIOS = ("fleet-herd", "fleet-warm")  # bench/fleet.py: only when asked (SeaweedFS, Redis, haproxy)
PP, ANCHOR, PP_W = "pullproxy", "anchor", "pullproxy_workers"
ACCEPT = ", ".join(MANIFEST_ACCEPT)


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    blob_size: int = 256 * MiB
    clients: int = 16
    repeats: int = 3
    rps_duration: float = 5.0
    rps_connections: int = 16
    rps_blob_size: int = 1 * MiB
    workers: int = 2
    scenarios: tuple[str, ...] = SCENARIOS
    loadgen: str = "auto"
    json_path: Path | None = None
    profile_dir: Path | None = None
    profile_native: bool = False
    keep: bool = False
    quick: bool = False
    fleet_clients: int = 48
    fleet_blob_size: int = 64 * MiB


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 repetition and 2 s load runs (about 2 minutes)")
    p.add_argument("--repeats", type=int, help="repetitions of each scenario; medians are quoted (default 3)")
    p.add_argument("--blob-size", default="256MiB", help="size of the cold and warm blob (default 256MiB)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in herd and warm-16 (default 16)")
    p.add_argument("--rps-duration", type=float, help="seconds per requests-per-second run (default 5)")
    p.add_argument("--rps-connections", type=int, default=16, help="keep-alive connections for rps (default 16)")
    p.add_argument("--rps-blob-size", default="1MiB", help="blob size of the rps blob scenario (default 1MiB)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also run cold-herd, warm and rps against pullproxy --workers N (0 or 1: skip)",
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="rps load generator: wrk if installed (auto), or the asyncio generator",
    )
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the measured runs, profile pullproxy with py-spy during an extra warm/rps run",
    )
    p.add_argument("--profile-native", action="store_true", help="with --profile: include C frames (py-spy --native)")
    p.add_argument("--fleet-clients", type=int, default=48, help="clients of the fleet cold herd (default 48)")
    p.add_argument("--fleet-blob-size", default="64MiB", help="blob size of the fleet scenarios (default 64MiB)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches) for inspection")
    a = p.parse_args(argv)
    scenarios = tuple(s.strip() for s in a.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in (*SCENARIOS, *FLEET_SCENARIOS)]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join((*SCENARIOS, *FLEET_SCENARIOS))}")
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    if repeats < 1 or a.clients < 1 or a.rps_connections < 1:
        p.error("--repeats, --clients and --rps-connections must be positive")
    return Options(
        blob_size=parse_size(a.blob_size),
        clients=a.clients,
        repeats=repeats,
        rps_duration=a.rps_duration if a.rps_duration is not None else (2.0 if a.quick else 5.0),
        rps_connections=a.rps_connections,
        rps_blob_size=parse_size(a.rps_blob_size),
        workers=a.workers,
        scenarios=scenarios,
        loadgen=a.loadgen,
        json_path=a.json,
        profile_dir=a.profile,
        profile_native=a.profile_native,
        keep=a.keep,
        quick=a.quick,
        fleet_clients=a.fleet_clients,
        fleet_blob_size=parse_size(a.fleet_blob_size),
    )


# --------------------------------------------------------------------------- helpers

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def run_clients(spec: blob_client.Spec) -> dict[str, Any]:
    """The blob client in its own process (see bench/client.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "bench.client", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=spec.timeout + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench client failed: {out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


class BlobMaker:
    """Unique blobs fast: a random 1 MiB block, each chunk prefixed with a per-blob nonce and its index."""

    def __init__(self) -> None:
        self.block = os.urandom(MiB)

    def chunks(self, size: int, nonce: bytes) -> Iterator[bytes]:
        for i in range((size + MiB - 1) // MiB):
            n = min(MiB, size - i * MiB)
            yield (nonce + i.to_bytes(8, "big") + self.block[24:])[:n]

    def push(self, registry_url: str, repo: str, size: int) -> Blob:
        nonce = os.urandom(16)
        h = hashlib.sha256()
        for chunk in self.chunks(size, nonce):
            h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        with Pusher(registry_url, timeout=300) as p:
            p.push_blob_stream(repo, digest, size, self.chunks(size, nonce))
        return Blob(digest, size, "application/octet-stream")


@dataclass
class Target:
    key: str
    label: str
    url: str
    pid: int
    stored: Callable[[str], bool] | None = None  # does its local storage hold the blob yet


# --------------------------------------------------------------------------- the bench


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    better: str  # "lower", "higher" or "" (not comparable)
    pullproxy: float | str | None
    anchor: float | str | None
    note: str = ""
    pullproxy_label: str = "pullproxy"

    @property
    def ratio(self) -> float | None:
        if isinstance(self.pullproxy, int | float) and isinstance(self.anchor, int | float) and self.anchor:
            return self.pullproxy / self.anchor
        return None

    @property
    def winner(self) -> str:
        r = self.ratio
        if r is None or not self.better:
            if self.pullproxy == self.anchor and self.pullproxy is not None:
                return "="
            return ""
        if isinstance(self.pullproxy, int | float) and self.pullproxy == self.anchor:
            return "="
        if 0.95 <= r <= 1.05:
            return "≈ (±5%)"
        pp_wins = r < 1 if self.better == "lower" else r > 1
        return "pullproxy" if pp_wins else "anchor"


class Bench:
    def __init__(self, opts: Options, stack: contextlib.ExitStack) -> None:
        self.opts = opts
        self.stack = stack
        self.workdir = Path(tempfile.mkdtemp(prefix="pp-bench-"))
        if not opts.keep:
            stack.callback(shutil.rmtree, self.workdir, True)
        self.maker = BlobMaker()
        self.results: dict[str, Any] = {}
        self.rows: list[Row] = []
        self.profiles: list[profile.Profile] = []
        self.targets: dict[str, Target] = {}
        self.server_pids: list[int] = []
        # CPU-s that processes outside the benchmark used, and the scenario's seconds
        self.foreign_cpu: dict[str, tuple[float, float]] = {}
        self.upstream: Registry
        self.anchor: Registry
        self.loadgen_name = ""

    # -- setup -------------------------------------------------------------------------

    def start(self) -> None:
        say(f"work directory {self.workdir}")
        up = Registry(workdir=self.workdir / "upstream", start=False)
        self.stack.callback(up.stop)
        config = json.loads(up.config_path.read_text())
        config["log"]["accesslog"]["disabled"] = False  # one line per request: the upstream GET count
        up.config_path.write_text(json.dumps(config, indent=2))
        self.upstream = up.start()
        upstream_pid = pid_listening_on(up.port)
        if upstream_pid is not None:
            self.server_pids.append(upstream_pid)
        say(f"upstream  {up.url} (distribution, plain)")

        self.anchor = Registry(proxy_remote=up.url, workdir=self.workdir / "anchor")
        self.stack.callback(self.anchor.stop)
        pid = pid_listening_on(self.anchor.port)
        if pid is None:
            raise RuntimeError("cannot find the anchor's pid")
        storage = self.anchor.storage

        def anchor_stored(digest: str) -> bool:
            hexd = digest.split(":", 1)[1]
            return (storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data").exists()

        self.targets[ANCHOR] = Target(ANCHOR, "anchor", self.anchor.url, pid, anchor_stored)
        self.server_pids.append(pid)
        say(f"anchor    {self.anchor.url} (distribution proxy mode, pid {pid})")

        pp = self._proxy("pullproxy", [])
        self.targets[PP] = Target(PP, "pullproxy", pp.url, pp.pid or 0)
        self.server_pids.append(pp.pid or 0)
        say(f"pullproxy {pp.url} (pid {pp.pid})")
        if self.opts.workers > 1 and set(self.opts.scenarios) & {"cold-herd", "warm", "rps"}:
            ppw = self._proxy("pullproxy-workers", ["--workers", str(self.opts.workers)])
            label = f"pullproxy --workers {self.opts.workers}"
            self.targets[PP_W] = Target(PP_W, label, ppw.url, ppw.pid or 0)
            self.server_pids.append(ppw.pid or 0)
            say(f"{label} {ppw.url} (pid {ppw.pid})")

    def _proxy(self, name: str, args: list[str]) -> Proxy:
        config = {
            "server": {},
            "cache": {"max_size": "4GiB", "tag_ttl": "60s"},
            "upstream": [{"name": "docker.io", "url": self.upstream.url, "default": True}],
        }
        proxy = Proxy(config, args=args, workdir=self.workdir / name, start=False)
        self.stack.callback(proxy.stop)
        return proxy.start()

    def measure_foreign(self, name: str, step: Callable[[], None]) -> None:
        """Run a scenario and record how much CPU processes outside this benchmark took meanwhile."""
        before, started = foreign_cpu_snapshot(), time.monotonic()
        step()
        foreign = foreign_cpu_between(before, foreign_cpu_snapshot())
        self.foreign_cpu[name] = (max(0.0, foreign), time.monotonic() - started)

    def proxies(self) -> list[Target]:
        """pullproxy and the anchor: what every scenario compares."""
        return [self.targets[PP], self.targets[ANCHOR]]

    def with_workers(self) -> list[Target]:
        return [*self.proxies(), *([self.targets[PP_W]] if PP_W in self.targets else [])]

    # -- measuring helpers -------------------------------------------------------------

    def _log_offset(self) -> int:
        return self.upstream.log_path.stat().st_size if self.upstream.log_path.exists() else 0

    def _upstream_entries(
        self, offset: int, digest: str | None, target: Target | None, quiet: float = 1.0, limit: float = 60.0
    ) -> list[AccessEntry]:
        """Access-log entries since `offset`, once the blob is stored and the GET count stopped moving.

        distribution logs a request when it ends, and the anchor fetches a second copy in the
        background; so wait for its storage to hold the blob, then for 1 s without new GETs.
        """
        deadline = time.monotonic() + limit
        if digest and target is not None and target.stored is not None:
            while not target.stored(digest) and time.monotonic() < deadline:
                time.sleep(0.05)
        entries: list[AccessEntry] = []
        count, changed = -1, time.monotonic()
        while time.monotonic() < deadline:
            new, offset = read_access_log(self.upstream.log_path, offset)
            entries += new
            now = len(blob_gets(entries, digest)) if digest else len(entries)
            if now != count:
                count, changed = now, time.monotonic()
            elif time.monotonic() - changed >= quiet:
                break
            time.sleep(0.1)
        return entries

    def _blob_spec(self, target_url: str, repo: str, blob: Blob, clients: int) -> blob_client.Spec:
        return blob_client.Spec(
            url=target_url,
            path=f"/v2/{repo}/blobs/{blob.digest}",
            digest=blob.digest,
            clients=clients,
            size=blob.size,
            timeout=300,
        )

    @staticmethod
    def _check_bodies(result: dict[str, Any], what: str) -> int:
        ok = sum(1 for c in result["clients"] if c["ok"])
        bad = [c["error"] for c in result["clients"] if not c["ok"]]
        if bad:
            say(f"  !! {what}: {len(bad)} client(s) failed: {bad[:3]}")
        return ok

    def _push_cold(self, count: int) -> list[Blob]:
        blobs = []
        for i in range(count):
            blobs.append(self.maker.push(self.upstream.url, "bench/cold", self.opts.blob_size))
            say(f"  pushed cold blob {i + 1}/{count}")
        os.sync()  # no writeback of pushed data during the measurements
        return blobs

    # -- scenarios ---------------------------------------------------------------------

    def cold_herd(self) -> None:
        o = self.opts
        targets = self.with_workers()
        say(f"cold herd: {o.clients} clients x {o.blob_size // MiB} MiB, {o.repeats} repetition(s)")
        blobs = self._push_cold(o.repeats * len(targets))
        runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
        for rep in range(o.repeats):
            for t in targets:
                blob = blobs.pop()
                offset = self._log_offset()
                cpu = tree_cpu_seconds(t.pid)
                idle_rss = tree_rss(t.pid)
                with RssSampler(t.pid) as rss:
                    result = run_clients(self._blob_spec(t.url, "bench/cold", blob, o.clients))
                gets = blob_gets(self._upstream_entries(offset, blob.digest, t), blob.digest)
                cpu = tree_cpu_seconds(t.pid) - cpu
                firsts = [c["first_body_s"] for c in result["clients"] if c["first_body_s"] is not None]
                run = {
                    "wall_s": result["wall_s"],
                    "ttfb_median_s": median(firsts),
                    "ttfb_max_s": max(firsts) if firsts else None,
                    "upstream_gets": len(gets),
                    "upstream_bytes": sum(e.size for e in gets),
                    "correct_bodies": self._check_bodies(result, f"cold herd {t.label}"),
                    "peak_rss_bytes": rss.peak,
                    "peak_rss_sampled_bytes": rss.sampled_peak,
                    "proxy_cpu_s": cpu,
                    "rss_before_bytes": idle_rss,
                    "clients": result["clients"],
                }
                runs[t.key].append(run)
                say(
                    f"  rep {rep + 1} {t.label}: wall {run['wall_s']:.2f}s, ttfb med {run['ttfb_median_s']:.3f}s"
                    f" max {run['ttfb_max_s']:.3f}s, {len(gets)} upstream GET(s), "
                    f"{run['correct_bodies']}/{o.clients} ok, peak RSS {rss.peak / MiB:.0f} MiB, proxy CPU {cpu:.1f} s"
                )
        self.results["cold_herd"] = {k: {"runs": v, "median": self._medians(v)} for k, v in runs.items()}
        for key in [k for k in (PP, PP_W) if k in runs]:
            pp, an = self.results["cold_herd"][key]["median"], self.results["cold_herd"][ANCHOR]["median"]
            label = self.targets[key].label
            sc = f"1 cold herd ({o.clients}x{o.blob_size // MiB} MiB)"
            if key == PP_W:
                sc = f"5 {label}: cold herd"
            ok_pp = min(r["correct_bodies"] for r in runs[key])
            ok_an = min(r["correct_bodies"] for r in runs[ANCHOR])
            self.rows += [
                Row(sc, "wall time", "s", "lower", pp["wall_s"], an["wall_s"], pullproxy_label=label),
                Row(
                    sc,
                    "first byte, median client",
                    "s",
                    "lower",
                    pp["ttfb_median_s"],
                    an["ttfb_median_s"],
                    pullproxy_label=label,
                ),
                Row(
                    sc,
                    "first byte, slowest client",
                    "s",
                    "lower",
                    pp["ttfb_max_s"],
                    an["ttfb_max_s"],
                    pullproxy_label=label,
                ),
                Row(
                    sc,
                    "upstream GETs of the blob",
                    "",
                    "lower",
                    pp["upstream_gets"],
                    an["upstream_gets"],
                    pullproxy_label=label,
                ),
                Row(
                    sc,
                    "pulled from upstream",
                    "GiB",
                    "lower",
                    pp["upstream_bytes"] / (1 << 30),
                    an["upstream_bytes"] / (1 << 30),
                    pullproxy_label=label,
                ),
                Row(
                    sc,
                    "correct bodies (sha256), worst run",
                    "",
                    "higher",
                    f"{ok_pp}/{o.clients}",
                    f"{ok_an}/{o.clients}",
                    pullproxy_label=label,
                ),
                Row(
                    sc,
                    "proxy peak RSS (process tree)",
                    "MiB",
                    "lower",
                    pp["peak_rss_bytes"] / MiB,
                    an["peak_rss_bytes"] / MiB,
                    pullproxy_label=label,
                    note=f"before: {pp['rss_before_bytes'] / MiB:.0f} vs {an['rss_before_bytes'] / MiB:.0f} MiB",
                ),
                Row(
                    sc,
                    "proxy CPU time (user+sys)",
                    "s",
                    "lower",
                    pp["proxy_cpu_s"],
                    an["proxy_cpu_s"],
                    pullproxy_label=label,
                ),
            ]
        if self.opts.profile_dir is not None:
            t = self.targets[PP]
            blob = self.maker.push(self.upstream.url, "bench/cold", o.blob_size)
            os.sync()
            with profile.PySpy(
                t.pid,
                self.opts.profile_dir / "cold-herd.txt",
                f"pullproxy, cold herd {o.clients} clients x {o.blob_size // MiB} MiB",
                native=o.profile_native,
            ) as spy:
                run_clients(self._blob_spec(t.url, "bench/cold", blob, o.clients))
            if spy.profile:
                self.profiles.append(spy.profile)

    def cold_single(self) -> None:
        o = self.opts
        say(f"cold single: 1 client x {o.blob_size // MiB} MiB, {o.repeats} repetition(s)")
        direct = Target("upstream", "upstream direct", self.upstream.url, 0)
        targets = [*self.proxies(), direct]
        blobs = self._push_cold(o.repeats * len(targets))
        runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
        for rep in range(o.repeats):
            for t in targets:
                blob = blobs.pop()
                offset = self._log_offset()
                result = run_clients(self._blob_spec(t.url, "bench/cold", blob, 1))
                gets = blob_gets(self._upstream_entries(offset, blob.digest, t), blob.digest)
                c = result["clients"][0]
                run = {
                    "ttfb_s": c["first_body_s"],
                    "total_s": c["total_s"],
                    "upstream_gets": len(gets),
                    "correct": int(c["ok"]),
                }
                self._check_bodies(result, f"cold single {t.label}")
                runs[t.key].append(run)
                say(
                    f"  rep {rep + 1} {t.label}: first byte {c['first_body_s'] or 0:.3f}s, "
                    f"total {c['total_s'] or 0:.2f}s, {len(gets)} upstream GET(s), ok={c['ok']}"
                )
        res = {k: {"runs": v, "median": self._medians(v)} for k, v in runs.items()}
        self.results["cold_single"] = res
        pp, an, up = res[PP]["median"], res[ANCHOR]["median"], res["upstream"]["median"]
        sc = f"2 cold single ({o.blob_size // MiB} MiB)"
        self.rows += [
            Row(
                sc,
                "first byte",
                "s",
                "lower",
                pp["ttfb_s"],
                an["ttfb_s"],
                note=f"straight from upstream: {up['ttfb_s']:.3f} s",
            ),
            Row(
                sc,
                "total time",
                "s",
                "lower",
                pp["total_s"],
                an["total_s"],
                note=f"straight from upstream: {up['total_s']:.2f} s",
            ),
            Row(sc, "upstream GETs of the blob", "", "lower", pp["upstream_gets"], an["upstream_gets"]),
            Row(
                sc,
                "correct bodies, all runs",
                "",
                "higher",
                f"{sum(r['correct'] for r in runs[PP])}/{o.repeats}",
                f"{sum(r['correct'] for r in runs[ANCHOR])}/{o.repeats}",
            ),
        ]

    def cold_range(self) -> None:
        """What a lazy-pulling client (stargz-snapshotter, SOCI) asks first: the tail of a layer nobody pulled."""
        o = self.opts
        say(f"cold tail range: last 400 B of a fresh {o.blob_size // MiB} MiB blob, {o.repeats} repetition(s)")
        direct = Target("upstream", "upstream direct", self.upstream.url, 0)
        targets = [*self.proxies(), direct]
        blobs = self._push_cold(o.repeats * len(targets))
        runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
        with httpx.Client(timeout=600) as client:
            for rep in range(o.repeats):
                for t in targets:
                    blob = blobs.pop()
                    url = f"{t.url}/v2/bench/cold/blobs/{blob.digest}"
                    expected = client.get(
                        f"{self.upstream.url}/v2/bench/cold/blobs/{blob.digest}", headers={"Range": "bytes=-400"}
                    ).content  # distribution honours Range: the reference tail (not timed)
                    started = time.perf_counter()
                    with client.stream("GET", url, headers={"Range": "bytes=-400"}) as response:
                        body = b"".join(response.iter_raw())
                    elapsed = time.perf_counter() - started
                    correct = response.status_code == 206 and body == expected and len(body) == 400
                    runs[t.key].append(
                        {"last_byte_s": elapsed, "status": response.status_code, "correct": int(correct)}
                    )
                    say(f"  rep {rep + 1} {t.label}: {response.status_code}, {len(body)} B, last byte {elapsed:.3f}s")
        res = {k: {"runs": v, "median": self._medians(v)} for k, v in runs.items()}
        self.results["cold_range"] = res
        pp, an, up = res[PP]["median"], res[ANCHOR]["median"], res["upstream"]["median"]
        sc = f"2 cold tail range (last 400 B of {o.blob_size // MiB} MiB)"
        self.rows += [
            Row(
                sc,
                "time to last byte",
                "s",
                "lower",
                pp["last_byte_s"],
                an["last_byte_s"],
                note=f"straight from upstream: {up['last_byte_s']:.3f} s",
            ),
            Row(
                sc,
                "206 with the right 400 bytes, all runs",
                "",
                "higher",
                f"{sum(r['correct'] for r in runs[PP])}/{o.repeats}",
                f"{sum(r['correct'] for r in runs[ANCHOR])}/{o.repeats}",
            ),
        ]

    def _prime_blob(self, t: Target, repo: str, blob: Blob) -> None:
        """Fetch once through the proxy (verified) and wait until it is in its storage."""
        result = run_clients(self._blob_spec(t.url, repo, blob, 1))
        if not result["clients"][0]["ok"]:
            raise RuntimeError(f"priming {blob.digest} through {t.label} failed: {result['clients'][0]['error']}")
        deadline = time.monotonic() + 60
        while t.stored is not None and not t.stored(blob.digest) and time.monotonic() < deadline:
            time.sleep(0.05)

    def warm(self) -> None:
        o = self.opts
        targets = self.with_workers()
        say(f"warm: 1 and {o.clients} clients x {o.blob_size // MiB} MiB from the cache, {o.repeats} repetition(s)")
        blob = self.maker.push(self.upstream.url, "bench/warm", o.blob_size)
        for t in targets:
            self._prime_blob(t, "bench/warm", blob)
        os.sync()
        self.results["warm_blob"] = blob.digest
        runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
        for rep in range(o.repeats):
            for t in targets:
                offset = self._log_offset()
                single = run_clients(self._blob_spec(t.url, "bench/warm", blob, 1))
                cpu = tree_cpu_seconds(t.pid)
                herd = run_clients(self._blob_spec(t.url, "bench/warm", blob, o.clients))
                cpu = tree_cpu_seconds(t.pid) - cpu
                ok = self._check_bodies(single, f"warm single {t.label}") + self._check_bodies(
                    herd, f"warm {o.clients} {t.label}"
                )
                gets = blob_gets(self._upstream_entries(offset, blob.digest, None, quiet=0.2), blob.digest)
                run = {
                    "single_MBps": blob.size / single["wall_s"] / 1e6,
                    "concurrent_MBps": blob.size * o.clients / herd["wall_s"] / 1e6,
                    "correct": ok,
                    "upstream_gets": len(gets),
                    "concurrent_cpu_s_per_GiB": cpu / (blob.size * o.clients / (1 << 30)),
                }
                runs[t.key].append(run)
                say(
                    f"  rep {rep + 1} {t.label}: single {run['single_MBps']:.0f} MB/s, {o.clients} clients "
                    f"{run['concurrent_MBps']:.0f} MB/s, {ok}/{o.clients + 1} ok, {len(gets)} upstream GET(s), "
                    f"proxy CPU {run['concurrent_cpu_s_per_GiB']:.2f} s/GiB"
                )
        self.results["warm"] = {k: {"runs": v, "median": self._medians(v)} for k, v in runs.items()}
        for key in [k for k in (PP, PP_W) if k in runs]:
            pp, an = self.results["warm"][key]["median"], self.results["warm"][ANCHOR]["median"]
            label = self.targets[key].label
            sc = f"3 warm blob ({o.blob_size // MiB} MiB)" if key == PP else f"5 {label}: warm blob"
            self.rows += [
                Row(sc, "1 client", "MB/s", "higher", pp["single_MBps"], an["single_MBps"], pullproxy_label=label),
                Row(
                    sc,
                    f"{o.clients} clients, aggregate",
                    "MB/s",
                    "higher",
                    pp["concurrent_MBps"],
                    an["concurrent_MBps"],
                    pullproxy_label=label,
                ),
                Row(
                    sc,
                    f"proxy CPU per GiB served ({o.clients} clients)",
                    "s",
                    "lower",
                    pp["concurrent_cpu_s_per_GiB"],
                    an["concurrent_cpu_s_per_GiB"],
                    pullproxy_label=label,
                ),
            ]
        if self.opts.profile_dir is not None:
            t = self.targets[PP]
            with profile.PySpy(
                t.pid,
                self.opts.profile_dir / "warm-concurrent.txt",
                f"pullproxy, warm {o.clients} clients x {o.blob_size // MiB} MiB",
                native=o.profile_native,
            ) as spy:
                for _ in range(2):
                    run_clients(self._blob_spec(t.url, "bench/warm", blob, o.clients))
            if spy.profile:
                self.profiles.append(spy.profile)

    def _load(self, spec: loadgen.LoadSpec) -> loadgen.LoadResult:
        use_wrk = self.opts.loadgen == "wrk" or (self.opts.loadgen == "auto" and loadgen.wrk_path())
        return loadgen.run_wrk(spec) if use_wrk else loadgen.run_python(spec)

    def rps(self) -> None:
        o = self.opts
        targets = self.with_workers()
        image: PushedImage = push_oci_image(self.upstream.url, "bench/small", "latest", seed="pullproxy-bench")
        blob = self.maker.push(self.upstream.url, "bench/small", o.rps_blob_size)
        endpoints = {
            "manifest_tag": (f"/v2/bench/small/manifests/{image.tag}", image.digest, {"Accept": ACCEPT}),
            "manifest_digest": (f"/v2/bench/small/manifests/{image.digest}", image.digest, {"Accept": ACCEPT}),
            "blob": (f"/v2/bench/small/blobs/{blob.digest}", blob.digest, {}),
        }
        blob_name = f"{o.rps_blob_size / MiB:g} MiB blob" if o.rps_blob_size >= MiB else f"{o.rps_blob_size} B blob"
        names = {"manifest_tag": "manifest by tag", "manifest_digest": "manifest by digest", "blob": blob_name}
        for t in targets:  # prime and verify every body once
            for path, digest, headers in endpoints.values():
                check = blob_client.run(blob_client.Spec(url=t.url, path=path, digest=digest, headers=headers))
                if not check["clients"][0]["ok"]:
                    raise RuntimeError(f"{t.label} {path}: {check['clients'][0]['error']}")
            if t.stored is not None:
                self._prime_blob(t, "bench/small", blob)
        sizes = {"manifest_tag": len(image.manifest), "manifest_digest": len(image.manifest), "blob": blob.size}
        first = self._load(loadgen.LoadSpec(url=targets[0].url, path="/v2/", duration=1, connections=o.rps_connections))
        self.loadgen_name = first.tool
        say(
            f"rps: {', '.join(names.values())}; {o.rps_duration:g} s x {o.repeats} run(s) each, "
            f"load generator: {first.tool}"
        )
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {t.key: {e: [] for e in endpoints} for t in targets}
        for rep in range(o.repeats):
            for t in targets:
                for name, (path, digest, headers) in endpoints.items():
                    spec = loadgen.LoadSpec(
                        url=t.url,
                        path=path,
                        duration=o.rps_duration,
                        connections=o.rps_connections,
                        headers=headers,
                        digest=digest,
                    )
                    if rep == 0:  # warm up connections, JIT-free but caches and pools
                        self._load(loadgen.LoadSpec(**{**asdict(spec), "duration": 1.0}))
                    offset = self._log_offset()
                    cpu = tree_cpu_seconds(t.pid)
                    res = self._load(spec)
                    cpu = tree_cpu_seconds(t.pid) - cpu
                    upstream_requests = len(self._upstream_entries(offset, None, None, quiet=0.3, limit=5))
                    bad_size = res.requests and res.bytes_per_request < sizes[name]
                    run = {
                        "rps": res.rps,
                        "requests": res.requests,
                        "errors": res.errors,
                        "bytes_per_request": res.bytes_per_request,
                        "p50_ms": res.p50_ms,
                        "p99_ms": res.p99_ms,
                        "upstream_requests": upstream_requests,
                        "short_bodies": bool(bad_size),
                        "proxy_cpu_ms_per_request": 1000 * cpu / res.requests if res.requests else None,
                    }
                    if res.errors or bad_size:
                        say(f"  !! {t.label} {name}: {res.errors} errors, {res.bytes_per_request:.0f} B/response")
                    runs[t.key][name].append(run)
                    say(
                        f"  rep {rep + 1} {t.label} {names[name]}: {res.rps:.0f} req/s (p99 {res.p99_ms or 0:.1f} ms, "
                        f"{res.errors} errors, {upstream_requests} upstream requests, "
                        f"proxy CPU {run['proxy_cpu_ms_per_request'] or 0:.2f} ms/request)"
                    )
        self.results["rps"] = {
            "load_generator": first.tool,
            "targets": {
                k: {e: {"runs": v, "median": self._medians(v)} for e, v in per.items()} for k, per in runs.items()
            },
        }
        res_t = self.results["rps"]["targets"]
        for key in [k for k in (PP, PP_W) if k in runs]:
            label = self.targets[key].label
            sc = "4 requests/s (cached)" if key == PP else f"5 {label}: requests/s"
            for name in endpoints:
                pp, an = res_t[key][name]["median"], res_t[ANCHOR][name]["median"]
                note = ""
                if pp["upstream_requests"] or an["upstream_requests"]:
                    note = (
                        f"upstream requests per run: pullproxy {pp['upstream_requests']:.0f}, "
                        f"anchor {an['upstream_requests']:.0f}"
                    )
                cpu_note = (
                    f"proxy CPU per request: {pp['proxy_cpu_ms_per_request']:.2f} vs "
                    f"{an['proxy_cpu_ms_per_request']:.2f} ms"
                )
                note = f"{cpu_note}; {note}" if note else cpu_note
                self.rows.append(
                    Row(sc, names[name], "req/s", "higher", pp["rps"], an["rps"], note=note, pullproxy_label=label)
                )
        if self.opts.profile_dir is not None:
            t = self.targets[PP]
            for name, (path, digest, headers) in endpoints.items():
                spec = loadgen.LoadSpec(
                    url=t.url,
                    path=path,
                    duration=max(3.0, o.rps_duration),
                    connections=o.rps_connections,
                    headers=headers,
                    digest=digest,
                )
                with profile.PySpy(
                    t.pid,
                    self.opts.profile_dir / f"rps-{name}.txt",
                    f"pullproxy, rps {names[name]}",
                    native=o.profile_native,
                ) as spy:
                    self._load(spec)
                if spy.profile:
                    self.profiles.append(spy.profile)

    @staticmethod
    def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k in runs[0] if any(isinstance(r[k], int | float) and not isinstance(r[k], bool) for r in runs)]
        return {k: median([r[k] for r in runs]) for k in keys}


# --------------------------------------------------------------------------- output


def _fmt(value: float | str | None, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.2f} s"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    if unit in ("MiB", "MB/s", "req/s"):
        return f"{value:,.0f} {unit}"
    return f"{value:g}"


def _ratio(row: Row) -> str:
    r = row.ratio
    if r is None:
        return "-"
    return f"{r:.2f}x" if r >= 0.01 else f"{r:.3f}x"


def render(rows: list[Row], notes: list[str]) -> None:
    header = ["scenario", "metric", "pullproxy", "anchor", "pullproxy/anchor", "better", "note"]
    cells = [
        [r.scenario, r.metric, _fmt(r.pullproxy, r.unit), _fmt(r.anchor, r.unit), _ratio(r), r.winner, r.note]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        print(line)
        print("-" * len(line))
        last = None
        for c in cells:
            shown = [("" if c[0] == last else c[0]), *c[1:]]
            last = c[0]
            print("  ".join(v.ljust(w) for v, w in zip(shown, widths, strict=True)).rstrip())
        print()
        for n in notes:
            print(f"* {n}")
        return
    console = Console(width=max(160, shutil.get_terminal_size((160, 40)).columns))
    table = Table(title="pullproxy vs distribution 2.8 proxy mode (anchor): medians", show_lines=False)
    for h in header:
        table.add_column(h, justify="right" if h in ("pullproxy", "anchor", "pullproxy/anchor") else "left")
    last = None
    for r, c in zip(rows, cells, strict=True):
        style = {"pullproxy": "green", "anchor": "red"}.get(r.winner, "")
        if last is not None and r.scenario != last:
            table.add_section()
        shown = ["" if r.scenario == last else c[0], *c[1:]]
        shown[5] = f"[{style}]{c[5]}[/]" if style else c[5]
        table.add_row(*shown)
        last = r.scenario
    console.print(table)
    for n in notes:
        console.print(f"* {n}", highlight=False)


def code_version() -> str:
    """The commit of the code under test, and whether proxy/ or cache/ differ from it."""
    rev = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=10
        ).stdout.strip()
        or "(no git)"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "proxy", "cache"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=10,
    ).stdout.split()[1::2]
    if dirty:  # the measured code is not the commit: say so
        rev += f" + uncommitted changes to {', '.join(dirty)}"
    return rev


def machine_notes(opts: Options, loadgen_name: str, rev: str) -> tuple[list[str], dict[str, Any]]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    data = os.urandom(64 * MiB)
    started = time.perf_counter()
    hashlib.sha256(data).digest()
    sha_mbps = len(data) / (time.perf_counter() - started) / 1e6
    dist = subprocess.run([REGISTRY_BIN, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    meta = {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "pullproxy_commit": rev,
        "anchor": dist,
        "load_generator": loadgen_name,
        "client_sha256_MBps_per_core": round(sha_mbps),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
    }
    notes = [
        f"{os.cpu_count()} cores ({cpu}) shared by the clients, both proxies and the upstream registry: "
        "every figure includes that contention; all traffic on 127.0.0.1.",
        f"Medians of {opts.repeats} repetition(s). Anchor: {dist} in proxy mode. pullproxy {rev}, Python "
        f"{platform.python_version()}, default settings (one JSON access-log line per request; the anchor's "
        "access log is off).",
        "Clients: raw-socket threads in a separate process; every body is read fully and its sha256 checked "
        f"(sha256 runs at ~{sha_mbps:.0f} MB/s per core here, which bounds the warm MB/s figures). "
        "First byte = first body byte, from the moment all requests are released together.",
        "Upstream GETs are counted from the upstream registry's own access log (per digest; every cold run "
        "uses a newly pushed blob, so each proxy is cold).",
        "Peak RSS: VmHWM reset before each run and summed over the proxy's process tree (workers included).",
    ]
    if loadgen_name:
        notes.append(
            f"Requests/s: {loadgen_name} ({opts.rps_connections} keep-alive connections), "
            f"{opts.rps_duration:g} s per run; each body verified once before, status and bytes per "
            "response checked during the run."
        )
    return notes, meta


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)  # also when started in the background, where SIGINT is ignored
    if opts.loadgen == "wrk" and loadgen.wrk_path() is None:
        print("--loadgen wrk: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    if opts.profile_dir is not None and profile.pyspy_path() is None:
        print("--profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    started = time.monotonic()
    rev = code_version()  # before the servers start: the code they load
    try:
        with contextlib.ExitStack() as stack:
            bench = Bench(opts, stack)
            bench.start()
            steps: dict[str, Callable[[], None]] = {
                "cold-herd": bench.cold_herd,
                "cold-single": bench.cold_single,
                "cold-range": bench.cold_range,
                "warm": bench.warm,
                "rps": bench.rps,
            }
            fleet = FleetBench(bench)
            steps.update({"fleet-herd": fleet.cold_herd, "fleet-warm": fleet.warm})
            for name in (*SCENARIOS, *FLEET_SCENARIOS):
                if name in opts.scenarios:
                    bench.measure_foreign(name, steps[name])
            say("stopping servers")
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, work directory removed", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    notes, meta = machine_notes(opts, bench.loadgen_name, rev)
    cores = os.cpu_count() or 1
    shares = {k: cpu / (cores * secs) for k, (cpu, secs) in bench.foreign_cpu.items() if secs > 0}
    disturbed = {k: v for k, v in shares.items() if v > 0.10}
    summary = ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
    if disturbed:
        notes.append(
            f"WARNING: processes outside the benchmark used this share of the machine's CPU: {summary}; "
            "above 10% those figures are disturbed: rerun on a quiet machine."
        )
    else:
        notes.append(f"Share of the machine's CPU used by processes outside the benchmark: {summary} (quiet).")
    meta["foreign_cpu"] = {k: {"cpu_s": round(c, 1), "seconds": round(t, 1)} for k, (c, t) in bench.foreign_cpu.items()}
    notes.append(f"Total run time {elapsed:.0f} s.")
    rows = sorted(bench.rows, key=lambda r: r.scenario[0])
    print()
    render(rows, notes)
    for prof in bench.profiles:
        print()
        print(prof.report())
    if opts.json_path is not None:
        doc = {
            "meta": {**meta, "elapsed_s": round(elapsed, 1)},
            "table": [{**asdict(r), "ratio": r.ratio, "better_side": r.winner} for r in rows],
            "results": bench.results,
            "profiles": [
                {
                    "label": p.label,
                    "samples": p.samples,
                    "raw": str(p.raw_path),
                    "self": p.top(p.self_counts, 25),
                    "inclusive": p.top(p.total_counts, 25),
                }
                for p in bench.profiles
            ],
        }
        opts.json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nJSON written to {opts.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
