"""Run the pullproxy mirror as a real subprocess (``python -m proxy serve``).

Integration tests go through the same entry point, config file and uvicorn
server that production uses, so start-up, worker and restart behaviour is
covered too, not just the ASGI app.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .ports import free_port, wait_http
from .procs import Closing, spawn, stop, tail

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- TOML


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"cannot write {value!r} to TOML")
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Serialise nested dicts/lists to TOML (tables, arrays of tables, scalars).

    Enough for the proxy config; avoids a tomli-w test dependency. ``None``
    values are omitted, which lets tests drop a key by setting it to None.
    """
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping) or _is_table_array(value):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{_prefix}{_toml_key(key)}"
        if isinstance(value, Mapping):
            out += f"\n[{name}]\n" + to_toml(value, name + ".")
        else:
            for item in value:
                out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


# --------------------------------------------------------------------------- process


class Proxy(Closing):
    """The mirror on 127.0.0.1:<free port> with its own config file and cache dir.

    ``config`` is the TOML document as a dict (``server``, ``cache``,
    ``upstream`` list); ``server.listen`` and ``cache.dir`` are filled in unless
    given. ``upstream_url`` is a shortcut for a single default ``docker.io``
    upstream. ``args`` are extra CLI arguments (e.g. ``["--workers", "2"]``) and
    ``env`` extra environment variables. Port and cache survive ``stop()``/
    ``start()`` so restarts can be tested. ``config_text`` is TOML appended as is
    (tables such as ``SeaweedFS.storage_toml()``); ``port`` picks the listening port
    (default: a free one), known as ``.url`` before ``start()``.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        upstream_url: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        start: bool = True,
        start_timeout: float = 30.0,
        verify: ssl.SSLContext | None = None,
        config_text: str = "",
        port: int | None = None,
    ) -> None:
        self._owns_dir = workdir is None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pp-proxy-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "pullproxy.toml"
        self.log_path = self.dir / "proxy.log"
        self.args = list(args)
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.config: dict[str, Any] = {k: _copy(v) for k, v in (config or {}).items()}
        self.config_text = config_text
        server = self.config.setdefault("server", {})
        if "listen" not in server:
            server["listen"] = f"127.0.0.1:{port or free_port()}"
        self.host = str(server["listen"])
        self.port = int(self.host.rsplit(":", 1)[1])
        # With server.tls_cert the mirror speaks HTTPS; ``verify`` trusts its CA (and may hold a client pair).
        self.url = f"{'https' if server.get('tls_cert') else 'http'}://{self.host}"
        self.verify: ssl.SSLContext | bool = verify if verify is not None else True
        cache = self.config.setdefault("cache", {})
        cache.setdefault("dir", str(self.dir / "cache"))
        cache.setdefault("max_size", "1GiB")
        cache.setdefault("tag_ttl", "30s")
        self.cache_dir = Path(cache["dir"])
        if upstream_url is not None and "upstream" not in self.config:
            self.config["upstream"] = [{"name": "docker.io", "url": upstream_url, "default": True}]
        self.write_config()
        self._proc: subprocess.Popen[bytes] | None = None
        if start:
            try:
                self.start()
            except BaseException:
                # Nobody gets a handle to close, so clean up here (the error carries the log tail).
                self.close()
                raise

    def write_config(self) -> None:
        """(Re)write the TOML file from ``self.config``; call before a restart to change it."""
        self.config_path.write_text(to_toml(self.config) + ("\n" + self.config_text if self.config_text else ""))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float | None = None) -> Proxy:
        """Start (or restart) on the same port and cache; wait until ``/v2/`` answers."""
        if self.running:
            return self
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path), *self.args]
        with open(self.log_path, "a") as log:
            log.write(f"--- start: {' '.join(argv)}\n")
        self._proc = spawn(argv, self.log_path, env=env, cwd=REPO_ROOT)
        try:
            wait_http(f"{self.url}/v2/", timeout or self.start_timeout, alive=lambda: self.running, verify=self.verify)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"pullproxy failed to start: {exc}\n--- log tail:\n{tail(self.log_path)}") from exc
        return self

    def stop(self, timeout: float = 15.0) -> None:
        stop(self._proc, timeout=timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, connections broken off, nothing released."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        stop(self._proc)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __repr__(self) -> str:
        return f"Proxy({self.url}, dir={self.dir})"


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def mirror(upstream: HasUrl, tag_ttl: str = "30s", **upstream_keys: object) -> Proxy:
    """A mirror (not started) of one upstream as the default, Docker Hub's name, with `tag_ttl`."""
    return Proxy(
        {
            "cache": {"tag_ttl": tag_ttl},
            "upstream": [{"name": "docker.io", "url": upstream.url, "default": True, **upstream_keys}],
        }
    )


class HasUrl(Protocol):
    url: str
