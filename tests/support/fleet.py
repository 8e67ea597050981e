"""A fleet of pullproxy replicas as production runs it: SeaweedFS + Redis + N replicas + haproxy.

Every replica is a real `python -m proxy serve` with `[storage] backend = "s3"` on the shared
bucket, `[coordination]` on the shared Redis with one peer secret, its own local cache folder
(the hot tier) and an `advertise_url` of its own address; haproxy spreads clients over them
round-robin. Faults are methods: kill or restart a replica, stop or start Redis or the object
store, each keeping ports and (for the store) data so the fleet comes back as it was.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import obstore
from obstore.store import S3Store

from .haproxy import HAProxy
from .ports import free_port
from .procs import Closing
from .proxy import Proxy
from .redis_server import RedisServer
from .seaweed import SeaweedFS

PEER_SECRET = "pullproxy-fleet-test-peer-secret"
PEER_SECRET_ENV = "PULLPROXY_PEER_SECRET"
CANARY = ".pullproxy-test-canary"  # outside the cache's prefixes


class Fleet(Closing):
    """``replicas`` pullproxy processes behind one haproxy (``.url``/``.host``), sharing a bucket and Redis.

    ``config`` is each replica's config dict as :class:`Proxy` takes it (``cache``, ``upstream``,
    ``hosted``…); ``upstream_url`` is the single-default-upstream shortcut. ``storage`` adds keys
    to `[storage]` (``redirect = true``…). With ``backend="disk"`` no object store runs and each
    replica keeps content on its own disk, `[coordination]` still shared (single flight alone).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        upstream_url: str | None = None,
        replicas: int = 3,
        backend: str = "s3",
        storage: Mapping[str, object] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        health_checks: bool = True,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pp-fleet-"))
        self.weed: SeaweedFS | None = None
        self.redis: RedisServer | None = None
        self.replicas: list[Proxy] = []
        self.haproxy: HAProxy | None = None
        try:
            self.weed = SeaweedFS() if backend == "s3" else None
            self.redis = RedisServer()
            environment = {
                PEER_SECRET_ENV: PEER_SECRET,
                **(self.weed.environment() if self.weed else {}),
                **(env or {}),
            }
            storage_toml = self.weed.storage_toml(**dict(storage or {})) if self.weed else ""
            for index in range(replicas):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                text = (
                    storage_toml
                    + "\n"
                    + self.redis.coordination_toml(advertise_url=url, peer_secret_env=PEER_SECRET_ENV)
                )
                self.replicas.append(
                    Proxy(
                        config,
                        upstream_url=upstream_url,
                        args=args,
                        env=environment,
                        workdir=self.dir / f"replica{index}",
                        start=False,
                        config_text=text,
                        port=port,
                    )
                )
            with ThreadPoolExecutor(max_workers=replicas) as pool:
                list(pool.map(lambda proxy: proxy.start(), self.replicas))
            self.haproxy = HAProxy([proxy.url for proxy in self.replicas], health_checks=health_checks)
            self.wait_up()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ addresses

    @property
    def lb(self) -> HAProxy:
        assert self.haproxy is not None
        return self.haproxy

    @property
    def url(self) -> str:
        return self.lb.url

    @property
    def host(self) -> str:
        return self.lb.host

    @property
    def store(self) -> SeaweedFS:
        assert self.weed is not None, "this fleet runs without an object store"
        return self.weed

    @property
    def redis_server(self) -> RedisServer:
        assert self.redis is not None
        return self.redis

    def name(self, index: int) -> str:
        """The haproxy server name of replica ``index`` (as in ``haproxy.served_by()``)."""
        return self.lb.names[index]

    def index_of(self, url: str) -> int:
        """Which replica advertises ``url``."""
        return [proxy.url for proxy in self.replicas].index(url.rstrip("/"))

    # ------------------------------------------------------------------ faults

    def wait_up(self, timeout: float = 20.0) -> None:
        """Until haproxy's checks see every running replica up."""
        for index, proxy in enumerate(self.replicas):
            if proxy.running:
                self.lb.wait_status(self.name(index), "UP", timeout)

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` (a crash: no shutdown, downloads cut mid-stream)."""
        self.replicas[index].kill()

    def restart(self, index: int, *, empty_local: bool = False) -> Proxy:
        """Start replica ``index`` again on its port; ``empty_local`` first wipes its local tier."""
        proxy = self.replicas[index]
        proxy.stop()
        if empty_local:
            shutil.rmtree(proxy.cache_dir, ignore_errors=True)
        proxy.start()
        self.lb.wait_status(self.name(index), "UP")
        return proxy

    def stop_redis(self) -> None:
        self.redis_server.stop()

    def start_redis(self) -> None:
        self.redis_server.start()

    def stop_store(self) -> None:
        """The object store goes away at once (an outage, not a shutdown); data is kept."""
        obstore.put(self._bucket(), CANARY, b"held before the outage")
        self.store.kill()

    def start_store(self, timeout: float = 60.0) -> None:
        """Back on the same endpoint; returns once it serves again what it held (SeaweedFS answers
        500 for older objects for a moment after a restart, until its volumes are registered)."""
        self.store.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                obstore.get(self._bucket(), CANARY).bytes()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _bucket(self) -> S3Store:
        weed = self.store
        return S3Store(
            weed.bucket,
            endpoint=weed.endpoint,
            access_key_id=weed.access_key,
            secret_access_key=weed.secret_key,
            region="us-east-1",
            client_options={"allow_http": True},
        )

    def log_text(self) -> str:
        return "\n".join(f"=== replica {i}\n{proxy.log_text()}" for i, proxy in enumerate(self.replicas))

    def close(self) -> None:
        if self.haproxy is not None:
            self.haproxy.close()
        for proxy in self.replicas:
            proxy.close()
        if self.redis is not None:
            self.redis.close()
        if self.weed is not None:
            self.weed.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Fleet({self.url}, {len(self.replicas)} replicas)"
