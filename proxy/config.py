"""Configuration: built-in defaults, an optional TOML file, then environment overrides.

Every problem is reported as one `ConfigError` naming the key, so a bad file stops
start-up with a message a person can act on.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import references

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
ENV_PREFIX = "PULLPROXY_"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PREFIX = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")


class ConfigError(ValueError):
    """A configuration problem, phrased as `key: problem`."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    default: bool = False
    prefix: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    connect_timeout: float = 5.0
    max_connections: int = 64

    @property
    def is_docker_hub(self) -> bool:
        return self.name in DOCKER_HUB_ALIASES


@dataclass(frozen=True)
class PinConfig:
    image: str  # a full reference, e.g. "docker.io/library/python:3.12"
    platforms: tuple[str, ...] | None = None  # None: every platform of a multi-arch image


@dataclass(frozen=True)
class Config:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    workers: int = 1
    log_format: str = "auto"
    cache_dir: Path = Path("pullproxy-data")
    max_size: int = 10 << 30
    tag_ttl: float = 60.0
    offline: bool = False
    pin_refresh: float = 3600.0
    upstreams: tuple[UpstreamConfig, ...] = ()
    pins: tuple[PinConfig, ...] = ()

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)


DEFAULT_UPSTREAM = UpstreamConfig(name=DOCKER_HUB, url="https://registry-1.docker.io", default=True)


def parse_size(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {value!r} is not a size such as '10GiB' or '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(key: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(value))
    if match is None:
        raise ConfigError(f"{key}: {value!r} is not a duration such as '30s', '5m' or '1h'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_listen(key: str, value: object) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {value!r} is not 'host:port', e.g. '0.0.0.0:5000'")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_bool(key: str, value: object) -> bool:
    """TOML booleans, and their spellings in environment variables."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"{key}: {value!r} must be true or false")


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return value


def _check_keys(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(allowed))})")


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def _upstream(index: int, table: object, environ: dict[str, str]) -> UpstreamConfig:
    where = f"upstream[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([[upstream]])")
    allowed = {
        "name", "url", "default", "prefix", "username", "password", "password_env",
        "timeout", "connect_timeout", "max_connections",
    }  # fmt: skip
    _check_keys(where, table, allowed)
    for required in ("name", "url"):
        if required not in table:
            raise ConfigError(f"{where}.{required}: missing")
    name = _string(f"{where}.name", table["name"]).lower()
    url = _string(f"{where}.url", table["url"]).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{where}.url: {url!r} must start with http:// or https://")
    prefix = table.get("prefix")
    if prefix is not None and not _PREFIX.match(_string(f"{where}.prefix", prefix)):
        raise ConfigError(f"{where}.prefix: {prefix!r} must be one repository path component, e.g. 'internal'")
    password = table.get("password")
    if "password_env" in table:
        variable = _string(f"{where}.password_env", table["password_env"])
        if variable not in environ:
            raise ConfigError(f"{where}.password_env: environment variable {variable} is not set")
        password = environ[variable]
    username = table.get("username")
    if (username is None) != (password is None):
        raise ConfigError(f"{where}: username and password (or password_env) go together")
    default = table.get("default", False)
    if not isinstance(default, bool):
        raise ConfigError(f"{where}.default: must be true or false")
    max_connections = table.get("max_connections", 64)
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigError(f"{where}.max_connections: must be a positive integer")
    return UpstreamConfig(
        name=name,
        url=url,
        default=default,
        prefix=prefix,
        username=username,
        password=password,
        timeout=parse_duration(f"{where}.timeout", table.get("timeout", 30)),
        connect_timeout=parse_duration(f"{where}.connect_timeout", table.get("connect_timeout", 5)),
        max_connections=max_connections,
    )


def _pin(index: int, table: object) -> PinConfig:
    where = f"pin[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([[pin]])")
    _check_keys(where, table, {"image", "platforms"})
    if "image" not in table:
        raise ConfigError(f"{where}.image: missing")
    image = _string(f"{where}.image", table["image"])
    try:
        references.parse(image)
    except ValueError as exc:
        raise ConfigError(f"{where}.image: {exc}") from None
    platforms = table.get("platforms")
    if platforms is not None:
        if not isinstance(platforms, list) or not platforms:
            raise ConfigError(f'{where}.platforms: must be a non-empty list such as ["linux/amd64"]')
        for platform in platforms:
            if not isinstance(platform, str) or not references.valid_platform(platform):
                raise ConfigError(f"{where}.platforms: {platform!r} is not 'os/arch' or 'os/arch/variant'")
        platforms = tuple(platforms)
    return PinConfig(image, platforms)


def _apply_environment(data: dict[str, Any], environ: dict[str, str]) -> None:
    """`PULLPROXY_<SECTION>_<KEY>` overrides `[section] key`, e.g. PULLPROXY_CACHE_MAX_SIZE."""
    for section in ("server", "cache"):
        for name, value in environ.items():
            head = f"{ENV_PREFIX}{section.upper()}_"
            if name.startswith(head):
                data.setdefault(section, {})[name[len(head) :].lower()] = value


def load(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _check_keys("(top level)", data, {"server", "cache", "upstream", "pin"})
    _apply_environment(data, environ)

    server = _table(data, "server")
    _check_keys("server", server, {"listen", "workers", "log_format"})
    host, port = parse_listen("server.listen", server.get("listen", "0.0.0.0:5000"))
    try:
        workers = int(server.get("workers", 1))
    except (TypeError, ValueError):
        workers = 0
    if workers < 1:
        raise ConfigError(f"server.workers: {server.get('workers')!r} must be a positive integer")
    log_format = server.get("log_format", "auto")
    if log_format not in ("auto", "json", "console"):
        raise ConfigError(f"server.log_format: {log_format!r} must be 'auto', 'json' or 'console'")

    cache = _table(data, "cache")
    _check_keys("cache", cache, {"dir", "max_size", "tag_ttl", "offline", "pin_refresh"})
    cache_dir = Path(_string("cache.dir", cache.get("dir", "pullproxy-data")))

    raw_upstreams = data.get("upstream", [])
    if not isinstance(raw_upstreams, list):
        raise ConfigError("upstream: must be an array of tables ([[upstream]])")
    upstreams = tuple(_upstream(i, table, environ) for i, table in enumerate(raw_upstreams)) or (DEFAULT_UPSTREAM,)
    _check_upstreams(upstreams)
    raw_pins = data.get("pin", [])
    if not isinstance(raw_pins, list):
        raise ConfigError("pin: must be an array of tables ([[pin]])")
    return Config(
        listen_host=host,
        listen_port=port,
        workers=workers,
        log_format=log_format,
        cache_dir=cache_dir,
        max_size=parse_size("cache.max_size", cache.get("max_size", "10GiB")),
        tag_ttl=parse_duration("cache.tag_ttl", cache.get("tag_ttl", "60s")),
        offline=parse_bool("cache.offline", cache.get("offline", False)),
        pin_refresh=parse_duration("cache.pin_refresh", cache.get("pin_refresh", "1h")),
        upstreams=upstreams,
        pins=tuple(_pin(i, table) for i, table in enumerate(raw_pins)),
    )


def _check_upstreams(upstreams: tuple[UpstreamConfig, ...]) -> None:
    if sum(u.default for u in upstreams) > 1:
        raise ConfigError("upstream: only one upstream may have default = true")
    names: set[str] = set()
    prefixes: set[str] = set()
    for index, upstream in enumerate(upstreams):
        aliases = DOCKER_HUB_ALIASES if upstream.is_docker_hub else {upstream.name}
        if names & aliases:
            raise ConfigError(f"upstream[{index}].name: {upstream.name!r} is configured twice")
        names |= aliases
        prefix = effective_prefix(upstream)
        if prefix is not None:
            if prefix in prefixes:
                raise ConfigError(f"upstream[{index}].prefix: {prefix!r} is used by another upstream")
            prefixes.add(prefix)


def effective_prefix(upstream: UpstreamConfig) -> str | None:
    """The path prefix that names this upstream: `prefix`, else its name when that can be one."""
    if upstream.prefix is not None:
        return upstream.prefix
    return upstream.name if _PREFIX.match(upstream.name) else None
