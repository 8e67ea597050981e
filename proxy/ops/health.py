"""Liveness and readiness for orchestrators and load balancers: cheap answers in JSON.

`/healthz` says the process answers. `/readyz` says whether the cache can take new
content, by writing a file where downloads land (at most every few seconds, as probes
are frequent), and reports each upstream's last known state (and whether it is being
backed off from, see `proxy.upstream`) without making it a condition: the mirror serves
its cache while an upstream is down, so that is no reason to take it out of rotation.
With `[coordination]` it also reports the fleet's Redis and the live replicas: Redis
unreachable makes the answer `degraded` (still 200: the replica serves by digest, and asks
tags upstream, so every replica of the fleet would otherwise be taken out at once).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy import tls
from proxy.upstream.client import Upstream

if TYPE_CHECKING:  # redis-py: loaded only with [coordination]
    from proxy.fleet.replicas import ReplicaRegistry

PROBE_INTERVAL = 2.0


class CacheProbe:
    """Whether `directory` takes a new file, remembered for `PROBE_INTERVAL` seconds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.problem: str | None = None
        self._checked = float("-inf")

    async def check(self) -> str | None:
        """None when writable, else why not."""
        if time.monotonic() - self._checked >= PROBE_INTERVAL:
            self.problem = await to_thread.run_sync(_write_probe, self.directory)
            self._checked = time.monotonic()
        return self.problem


def _write_probe(directory: Path) -> str | None:
    try:
        fd, path = tempfile.mkstemp(dir=directory, prefix=".probe-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as exc:
        return f"cannot write to {directory}: {exc.strerror or exc}"
    return None


def upstream_state(upstream: Upstream) -> dict[str, object]:
    """`ok`, `failing` (its last failure is newer than its last success, or it is being backed
    off from) or `unknown` (not asked yet); `backoff_until` is when it is probed next while
    requests to it are refused at once, else None."""
    ok, error, backoff = upstream.last_ok, upstream.last_error, upstream.backoff_until
    failing = backoff is not None or (error is not None and (ok is None or error[0] >= ok))
    state = "failing" if failing else "unknown" if ok is None else "ok"
    return {
        "name": upstream.name,
        "url": upstream.config.url,
        "state": state,
        "last_ok": ok,
        "last_error": None if error is None else {"at": error[0], "what": error[1]},
        "backoff_until": backoff,
        "tls": tls.upstream_trust(upstream.config).value,  # "not verified" with insecure_skip_verify
    }


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def degraded(fleet: ReplicaRegistry | None) -> list[str]:
    """What works less well than it should without taking the replica out: Redis unreachable."""
    if fleet is None or fleet.health.problem is None:
        return []
    return [f"redis unreachable ({fleet.health.problem}): tags are asked upstream, the fleet is not coordinated"]


async def readyz(request: Request) -> Response:
    problem = await request.app.state.probe.check()
    fleet: ReplicaRegistry | None = getattr(request.app.state, "fleet", None)
    reasons = degraded(fleet)
    body = {
        "ready": problem is None,
        "status": "unready" if problem is not None else "degraded" if reasons else "ok",
        "degraded": reasons,
        "cache": {"writable": problem is None, "problem": problem},
        "upstreams": [upstream_state(upstream) for upstream in request.app.state.mirror.upstreams],
        "tls": tls.describe_server(),  # whether the listener speaks HTTPS, and until when its certificate holds
    }
    if fleet is not None:
        body["coordination"] = fleet.state()
    return JSONResponse(body, status_code=200 if problem is None else 503)
