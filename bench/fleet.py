"""Fleet rows of the bench: three pullproxy replicas on SeaweedFS + Redis behind haproxy.

`fleet-herd`: the cold herd (`--fleet-clients`, default 48, one `--fleet-blob-size` blob) through
haproxy over three replicas, against the single-host mirror and against three independent
distribution proxies behind the same kind of haproxy (each fetches for itself): upstream GETs,
wall time, first byte, CPU per replica. `fleet-warm`: the blob cached, `--clients` clients through
haproxy over one, two and three replicas: aggregate MB/s and CPU seconds per GiB each replica
served (what a real fleet multiplies; on two cores the aggregate saturates).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from bench.system import blob_gets, pid_listening_on, tree_cpu_seconds
from tests.support.fleet import Fleet
from tests.support.haproxy import HAProxy
from tests.support.registry import Registry

if TYPE_CHECKING:
    from bench.run import Bench

MiB = 1 << 20
GiB = 1 << 30
REPLICAS = 3


class FleetBench:
    """The fleet and the three distribution proxies, started once for both fleet scenarios."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.fleet: Fleet | None = None
        self.anchors: list[Registry] = []
        self.anchor_lb: HAProxy | None = None

    def start(self) -> Fleet:
        if self.fleet is not None:
            return self.fleet
        from bench.run import say

        b = self.bench
        config = {"cache": {"max_size": "4GiB", "tag_ttl": "60s"}}
        self.fleet = Fleet(config, upstream_url=b.upstream.url, replicas=REPLICAS)
        b.stack.callback(self.fleet.close)
        say(f"fleet     {self.fleet.url} (haproxy) → {', '.join(p.url for p in self.fleet.replicas)}")
        return self.fleet

    def start_anchors(self) -> HAProxy:
        if self.anchor_lb is not None:
            return self.anchor_lb
        from bench.run import say

        b = self.bench
        for i in range(REPLICAS):
            reg = Registry(proxy_remote=b.upstream.url, workdir=b.workdir / f"anchor-fleet-{i}")
            b.stack.callback(reg.close)
            self.anchors.append(reg)
        self.anchor_lb = HAProxy([reg.url for reg in self.anchors])
        b.stack.callback(self.anchor_lb.close)
        for name in self.anchor_lb.names:
            self.anchor_lb.wait_status(name, "UP")
        say(f"anchors   {self.anchor_lb.url} (haproxy) → {', '.join(r.url for r in self.anchors)}")
        return self.anchor_lb

    # ------------------------------------------------------------------ cold herd

    def _anchor_stored(self, digest: str) -> bool:
        hexd = digest.split(":", 1)[1]
        return all(
            (reg.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data").exists()
            for reg in self.anchors
        )

    def _herd(self, url: str, pids: list[int], blob: Any, stored: Any) -> dict[str, Any]:
        from bench.run import Target, median, run_clients

        b, o = self.bench, self.bench.opts
        offset = b._log_offset()
        cpu = [tree_cpu_seconds(pid) for pid in pids]
        result = run_clients(b._blob_spec(url, "bench/cold", blob, o.fleet_clients))  # _push_cold pushes there
        target = Target("fleet", "fleet", url, 0, stored)
        gets = blob_gets(b._upstream_entries(offset, blob.digest, target), blob.digest)
        cpu = [tree_cpu_seconds(pid) - before for pid, before in zip(pids, cpu, strict=True)]
        firsts = [c["first_body_s"] for c in result["clients"] if c["first_body_s"] is not None]
        return {
            "wall_s": result["wall_s"],
            "ttfb_median_s": median(firsts),
            "ttfb_max_s": max(firsts) if firsts else None,
            "upstream_gets": len(gets),
            "upstream_bytes": sum(e.size for e in gets),
            "correct_bodies": b._check_bodies(result, url),
            "cpu_s": cpu,
        }

    def cold_herd(self) -> None:
        from bench.run import PP, Row, say

        b, o = self.bench, self.bench.opts
        fleet = self.start()
        anchor_lb = self.start_anchors()
        size = o.fleet_blob_size
        say(f"fleet cold herd: {o.fleet_clients} clients x {size // MiB} MiB over {REPLICAS} replicas")
        saved, o.blob_size = o.blob_size, size
        try:
            blobs = b._push_cold(3)
        finally:
            o.blob_size = saved
        single = b.targets[PP]
        replica_pids = [p.pid or 0 for p in fleet.replicas]
        anchor_pids = [pid_listening_on(reg.port) or 0 for reg in self.anchors]
        runs = {
            "fleet": self._herd(fleet.url, replica_pids, blobs[0], None),
            "single": self._herd(single.url, [single.pid], blobs[1], None),
            "anchors": self._herd(anchor_lb.url, anchor_pids, blobs[2], self._anchor_stored),
        }
        for name, run in runs.items():
            say(
                f"  {name}: wall {run['wall_s']:.2f}s, ttfb med {run['ttfb_median_s'] or 0:.3f}s max "
                f"{run['ttfb_max_s'] or 0:.3f}s, {run['upstream_gets']} upstream GET(s), "
                f"{run['correct_bodies']}/{o.fleet_clients} ok, CPU {', '.join(f'{c:.1f}' for c in run['cpu_s'])} s"
            )
        b.results["fleet_herd"] = runs
        fl, si, an = runs["fleet"], runs["single"], runs["anchors"]
        sc = f"6 fleet: cold herd ({o.fleet_clients}x{size // MiB} MiB, {REPLICAS} replicas behind haproxy)"
        label = f"pullproxy x{REPLICAS}"
        note_single = "single-host pullproxy: {}"

        def cpu_note(run: dict[str, Any]) -> str:
            return " / ".join(f"{c:.1f}" for c in run["cpu_s"])

        b.rows += [
            Row(
                sc,
                "upstream GETs of the blob",
                "",
                "lower",
                fl["upstream_gets"],
                an["upstream_gets"],
                note=note_single.format(si["upstream_gets"]),
                pullproxy_label=label,
            ),
            Row(
                sc,
                "wall time",
                "s",
                "lower",
                fl["wall_s"],
                an["wall_s"],
                note=note_single.format(f"{si['wall_s']:.2f} s"),
                pullproxy_label=label,
            ),
            Row(
                sc,
                "first byte, median client",
                "s",
                "lower",
                fl["ttfb_median_s"],
                an["ttfb_median_s"],
                note=note_single.format(f"{si['ttfb_median_s'] or 0:.3f} s"),
                pullproxy_label=label,
            ),
            Row(
                sc,
                "first byte, slowest client",
                "s",
                "lower",
                fl["ttfb_max_s"],
                an["ttfb_max_s"],
                note=note_single.format(f"{si['ttfb_max_s'] or 0:.3f} s"),
                pullproxy_label=label,
            ),
            Row(
                sc,
                "CPU per replica, the busiest",
                "s",
                "lower",
                max(fl["cpu_s"]),
                max(an["cpu_s"]),
                note=f"each: {cpu_note(fl)} vs {cpu_note(an)} s; single host {si['cpu_s'][0]:.1f} s",
                pullproxy_label=label,
            ),
            Row(
                sc,
                "correct bodies (sha256)",
                "",
                "higher",
                f"{fl['correct_bodies']}/{o.fleet_clients}",
                f"{an['correct_bodies']}/{o.fleet_clients}",
                note=note_single.format(f"{si['correct_bodies']}/{o.fleet_clients}"),
                pullproxy_label=label,
            ),
        ]

    # ------------------------------------------------------------------ warm

    def warm(self) -> None:
        from bench.run import Row, run_clients, say

        b, o = self.bench, self.bench.opts
        fleet = self.start()
        size = o.fleet_blob_size
        blob = b.maker.push(b.upstream.url, "bench/fleet", size)
        os.sync()
        for proxy in fleet.replicas:  # every replica serves it once: in the bucket and in each local tier
            primed = run_clients(b._blob_spec(proxy.url, "bench/fleet", blob, 1))
            if not primed["clients"][0]["ok"]:
                raise RuntimeError(f"priming through {proxy.url}: {primed['clients'][0]['error']}")
        say(f"fleet warm: {o.clients} clients x {size // MiB} MiB through haproxy over 1, 2 and 3 replicas")
        runs: dict[int, dict[str, Any]] = {}
        for count in range(1, REPLICAS + 1):
            members = fleet.replicas[:count]
            with HAProxy([p.url for p in members]) as lb:
                for name in lb.names:
                    lb.wait_status(name, "UP")
                lb.reset_log()
                pids = [p.pid or 0 for p in members]
                cpu = [tree_cpu_seconds(pid) for pid in pids]
                lb_pid = pid_listening_on(lb.port) or 0
                lb_cpu = tree_cpu_seconds(lb_pid)
                result = run_clients(b._blob_spec(lb.url, "bench/fleet", blob, o.clients))
                cpu = [tree_cpu_seconds(pid) - before for pid, before in zip(pids, cpu, strict=True)]
                lb_cpu = tree_cpu_seconds(lb_pid) - lb_cpu
                time.sleep(0.2)  # haproxy logs a request when it ends
                sent = {name: 0 for name in lb.names}
                for served in lb.requests():
                    if blob.digest in served.path and served.server in sent:
                        sent[served.server] += served.bytes
                per_gib = [c / (sent[n] / GiB) if sent[n] else None for c, n in zip(cpu, lb.names, strict=True)]
            runs[count] = {
                "aggregate_MBps": size * o.clients / result["wall_s"] / 1e6,
                "correct": b._check_bodies(result, f"fleet warm x{count}"),
                "cpu_s": cpu,
                "bytes_served": list(sent.values()),
                "cpu_s_per_GiB": per_gib,
                "haproxy_cpu_s_per_GiB": lb_cpu / (size * o.clients / GiB),
            }
            say(
                f"  {count} replica(s): {runs[count]['aggregate_MBps']:.0f} MB/s, {runs[count]['correct']}/{o.clients}"
                f" ok, CPU per GiB per replica {', '.join(f'{c:.2f}' for c in per_gib if c is not None)} s, "
                f"haproxy {runs[count]['haproxy_cpu_s_per_GiB']:.2f} s/GiB"
            )
        b.results["fleet_warm"] = runs
        sc = f"7 fleet: warm blob through haproxy ({o.clients} clients x {size // MiB} MiB)"
        for count, run in runs.items():
            per = [c for c in run["cpu_s_per_GiB"] if c is not None]
            b.rows += [
                Row(
                    sc,
                    f"{count} replica(s): aggregate",
                    "MB/s",
                    "higher",
                    run["aggregate_MBps"],
                    None,
                    note=f"{run['correct']}/{o.clients} correct",
                    pullproxy_label=f"pullproxy x{count}",
                ),
                Row(
                    sc,
                    f"{count} replica(s): CPU per GiB served, per replica",
                    "s",
                    "lower",
                    sum(per) / len(per) if per else None,
                    None,
                    note="each: "
                    + " / ".join(f"{c:.2f}" for c in per)
                    + f"; haproxy {run['haproxy_cpu_s_per_GiB']:.2f} s/GiB",
                    pullproxy_label=f"pullproxy x{count}",
                ),
            ]
