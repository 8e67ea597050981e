"""Run Debian's CNCF distribution 2.8 (``docker-registry``) as a real upstream.

Tests need a genuine registry, not a fake, so that the mirror is checked
against real-world V2 semantics (Accept negotiation, auth challenges, Range,
pagination). The same class runs distribution in pull-through proxy mode as the
benchmark reference point.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .ports import free_port, wait_http
from .procs import Closing, spawn, stop, tail

REGISTRY_BIN = "/usr/bin/docker-registry"


def htpasswd_lines(users: dict[str, str]) -> str:
    """bcrypt htpasswd content; distribution accepts only bcrypt entries."""
    import bcrypt

    out = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        out.append(f"{user}:{hashed}\n")
    return "".join(out)


class Registry(Closing):
    """A distribution 2.8 process on 127.0.0.1:<free port> with filesystem storage.

    ``users`` enables htpasswd Basic auth. ``proxy_remote`` turns it into a
    pull-through cache of that URL (read-only; pushes are refused), optionally
    authenticating upstream with ``proxy_username``/``proxy_password``.
    Storage and port survive ``stop()``/``start()`` so restarts can be tested.
    ``tls`` serves HTTPS (distribution's ``http.tls``: ``certificate``, ``key``,
    ``clientcas``), and ``storage`` another registry's storage folder (to read only).
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        proxy_remote: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        workdir: str | Path | None = None,
        log_level: str = "warn",
        start: bool = True,
        tls: dict[str, Any] | None = None,
        storage: Path | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self._owns_dir = workdir is None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pp-registry-"))
        self.storage = storage or self.dir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = dict(tls or {})
        self.url = f"{'https' if self.tls else 'http'}://{self.host}"
        self.verify: ssl.SSLContext | bool = verify if verify is not None else True
        self.users = dict(users or {})
        self.proxy_remote = proxy_remote
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config(proxy_username, proxy_password, log_level)
        if start:
            try:
                self.start()
            except BaseException:
                # Nobody gets a handle to close, so clean up here (the error carries the log tail).
                self.close()
                raise

    def _write_config(self, proxy_username: str | None, proxy_password: str | None, level: str) -> None:
        # JSON is valid YAML, which spares a PyYAML dependency and quoting bugs.
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": level, "accesslog": {"disabled": True}, "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "cache": {"blobdescriptor": "inmemory"},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                # A fixed secret keeps upload URLs valid across stop()/start().
                "secret": "pullproxy-test-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
                **({"tls": self.tls} if self.tls else {}),
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.users:
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text(htpasswd_lines(self.users))
            config["auth"] = {"htpasswd": {"realm": "pullproxy-test", "path": str(htpasswd)}}
        if self.proxy_remote:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote}
            if proxy_username is not None:
                proxy["username"] = proxy_username
                proxy["password"] = proxy_password or ""
            config["proxy"] = proxy
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> Registry:
        """Start (or restart) on the same port and storage; wait for ``/v2/``."""
        if self.running:
            return self
        self._proc = spawn([REGISTRY_BIN, "serve", str(self.config_path)], self.log_path)
        try:
            wait_http(f"{self.url}/v2/", timeout, alive=lambda: self.running, verify=self.verify)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"docker-registry failed to start: {exc}\n{tail(self.log_path)}") from exc
        return self

    def stop(self) -> None:
        stop(self._proc)
        self._proc = None

    def close(self) -> None:
        """Stop and delete the temp dir (only if we created it)."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def auth(self) -> tuple[str, str] | None:
        """First configured (user, password), handy for httpx ``auth=``."""
        return next(iter(self.users.items()), None)

    def __repr__(self) -> str:
        mode = "proxy" if self.proxy_remote else ("htpasswd" if self.users else "plain")
        return f"Registry({self.url}, {mode})"
