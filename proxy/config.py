"""Configuration: built-in defaults, an optional TOML file, then environment overrides.

Every problem is reported as one `ConfigError` naming the key, so a bad file stops
start-up with a message a person can act on.
"""

from __future__ import annotations

import ipaddress
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
# Matched with fullmatch: `$` would admit a final "\n".
_PREFIX = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_PATTERN = re.compile(r"(\*\*|[a-z0-9._:*-]+)(/(\*\*|[a-z0-9._:*-]+))*")

ANYONE = "anyone"
AUTHENTICATED = "authenticated"
MIN_TOKEN_KEY = 32  # bytes: HS256 wants a key at least as long as its hash
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Pull = str | tuple[str, ...]  # ANYONE, AUTHENTICATED, or user names and "group:<name>"


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
    ca_file: Path | None = None  # trusted in addition to the operating system's store
    client_cert: Path | None = None  # mutual TLS towards the upstream, with client_key
    client_key: Path | None = None
    insecure_skip_verify: bool = False

    @property
    def is_docker_hub(self) -> bool:
        return self.name in DOCKER_HUB_ALIASES


@dataclass(frozen=True)
class PinConfig:
    image: str  # a full reference, e.g. "docker.io/library/python:3.12"
    platforms: tuple[str, ...] | None = None  # None: every platform of a multi-arch image


@dataclass(frozen=True)
class UserConfig:
    name: str
    password_hash: str = field(repr=False)
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthConfig:
    htpasswd: Path | None = None
    users: tuple[UserConfig, ...] = ()
    token_key: bytes | None = field(default=None, repr=False)  # None: generated into the cache dir
    token_ttl: float = 300.0


@dataclass(frozen=True)
class AccessRule:
    repository: str  # glob on "<upstream>/<repository>", see proxy.access
    pull: Pull
    networks: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Config:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    workers: int = 1
    log_format: str = "auto"
    trusted_proxies: tuple[Network, ...] = ()
    max_header_size: int = 64 << 10
    header_timeout: float = 10.0
    max_connections: int = 1024
    max_connections_per_client: int = 128
    cache_dir: Path = Path("pullproxy-data")
    max_size: int = 10 << 30
    tag_ttl: float = 60.0
    offline: bool = False
    pin_refresh: float = 3600.0
    upstreams: tuple[UpstreamConfig, ...] = ()
    pins: tuple[PinConfig, ...] = ()
    auth: AuthConfig | None = None
    access: tuple[AccessRule, ...] = ()
    default_pull: Pull = ANYONE
    tls_cert: Path | None = None  # with tls_key: the listener speaks HTTPS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # clients must present a certificate this CA signed

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)


DEFAULT_UPSTREAM = UpstreamConfig(name=DOCKER_HUB, url="https://registry-1.docker.io", default=True)


def parse_size(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {value!r} is not a size such as '10GiB' or '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(key: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*", str(value))
    if match is None:
        raise ConfigError(f"{key}: {value!r} is not a duration such as '30s', '5m' or '1h'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_listen(key: str, value: object) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not re.fullmatch("[0-9]{1,5}", port) or not 0 < int(port) < 65536:
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


def _tables(data: dict[str, Any], key: str, name: str | None = None) -> list[tuple[int, object]]:
    """An array of tables (`[[key]]`), numbered for messages such as `upstream[1].url`."""
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{name or key}: must be an array of tables ([[{name or key}]])")
    return list(enumerate(value))


def _check_keys(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(allowed))})")


def _entry(where: str, table: object, array: str, allowed: set[str], required: tuple[str, ...]) -> dict[str, Any]:
    """One table of an array of tables (`[[array]]`), its keys checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([[{array}]])")
    _check_keys(where, table, allowed)
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}.{key}: missing")
    return table


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def _upstream(index: int, table: object, environ: dict[str, str]) -> UpstreamConfig:
    where = f"upstream[{index}]"
    allowed = {
        "name", "url", "default", "prefix", "username", "password", "password_env",
        "timeout", "connect_timeout", "max_connections",
        "ca_file", "client_cert", "client_key", "insecure_skip_verify",
    }  # fmt: skip
    table = _entry(where, table, "upstream", allowed, ("name", "url"))
    name = _string(f"{where}.name", table["name"]).lower()
    url = _string(f"{where}.url", table["url"]).rstrip("/")
    if not re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", url):
        raise ConfigError(f"{where}.url: {url!r} must start with http:// or https://")
    prefix = table.get("prefix")
    if prefix is not None and not _PREFIX.fullmatch(_string(f"{where}.prefix", prefix)):
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
    ca_file, client_cert, client_key, insecure = _upstream_tls(where, table)
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
        ca_file=ca_file,
        client_cert=client_cert,
        client_key=client_key,
        insecure_skip_verify=insecure,
    )


def _path(key: str, value: object) -> Path:
    return Path(_string(key, value))


def _tls_checked(keys: dict[str, str], check: Any) -> None:
    """Run a `proxy.tls` file check; its complaint names the key of the file it is about."""
    from proxy import tls

    try:
        check()
    except tls.TLSFileError as exc:
        raise ConfigError(f"{keys[exc.role.value]}: {exc}") from None


def _upstream_tls(where: str, table: dict[str, Any]) -> tuple[Path | None, Path | None, Path | None, bool]:
    from proxy import tls

    ca_file = _path(f"{where}.ca_file", table["ca_file"]) if "ca_file" in table else None
    client_cert = _path(f"{where}.client_cert", table["client_cert"]) if "client_cert" in table else None
    client_key = _path(f"{where}.client_key", table["client_key"]) if "client_key" in table else None
    if (client_cert is None) != (client_key is None):
        raise ConfigError(f"{where}: client_cert and client_key go together")
    insecure = parse_bool(f"{where}.insecure_skip_verify", table.get("insecure_skip_verify", False))
    if insecure and ca_file is not None:
        raise ConfigError(f"{where}: insecure_skip_verify = true ignores ca_file; keep one of them")
    keys = {"ca": f"{where}.ca_file", "certificate": f"{where}.client_cert", "key": f"{where}.client_key"}
    _tls_checked(keys, lambda: tls.check_upstream_files(ca_file, client_cert, client_key))
    return ca_file, client_cert, client_key, insecure


def _server_tls(server: dict[str, Any]) -> tuple[Path | None, Path | None, Path | None]:
    """`tls_cert` and `tls_key` turn HTTPS on; a pair that would not load stops start-up here."""
    from proxy import tls

    cert = _path("server.tls_cert", server["tls_cert"]) if "tls_cert" in server else None
    key = _path("server.tls_key", server["tls_key"]) if "tls_key" in server else None
    client_ca = _path("server.tls_client_ca", server["tls_client_ca"]) if "tls_client_ca" in server else None
    if (cert is None) != (key is None):
        raise ConfigError("server: tls_cert and tls_key go together")
    if client_ca is not None and cert is None:
        raise ConfigError("server.tls_client_ca: needs tls_cert and tls_key (client certificates need TLS)")
    if cert is not None and key is not None:
        keys = {"ca": "server.tls_client_ca", "certificate": "server.tls_cert", "key": "server.tls_key"}
        _tls_checked(keys, lambda: tls.check_server_files(cert, key, client_ca))
    return cert, key, client_ca


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
    _check_keys("(top level)", data, {"server", "cache", "upstream", "pin", "auth", "access"})
    _apply_environment(data, environ)

    server = _table(data, "server")
    _check_keys(
        "server",
        server,
        {
            "listen",
            "workers",
            "log_format",
            "trusted_proxies",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            *_CONNECTION_KEYS,
        },
    )
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
    proxies = server.get("trusted_proxies", [])
    if isinstance(proxies, str):  # from the environment: comma-separated
        proxies = [p.strip() for p in proxies.split(",") if p.strip()]
    trusted_proxies = _networks("server.trusted_proxies", proxies)
    tls_cert, tls_key, tls_client_ca = _server_tls(server)
    certificates = tls_client_ca is not None  # client certificates name users and groups too

    cache = _table(data, "cache")
    _check_keys("cache", cache, {"dir", "max_size", "tag_ttl", "offline", "pin_refresh"})
    cache_dir = Path(_string("cache.dir", cache.get("dir", "pullproxy-data")))

    upstreams = tuple(_upstream(i, table, environ) for i, table in _tables(data, "upstream")) or (DEFAULT_UPSTREAM,)
    _check_upstreams(upstreams)
    auth = _auth(data["auth"], environ) if "auth" in data else None
    default_pull: Pull = ANYONE
    if auth is not None:
        default_pull = _pull("auth.default", data["auth"].get("default", []), auth, certificates)
    access = tuple(_rule(i, table, auth, upstreams, certificates) for i, table in _tables(data, "access"))
    return Config(
        listen_host=host,
        listen_port=port,
        workers=workers,
        log_format=log_format,
        trusted_proxies=trusted_proxies,
        **_connection_limits(server),
        cache_dir=cache_dir,
        max_size=parse_size("cache.max_size", cache.get("max_size", "10GiB")),
        tag_ttl=parse_duration("cache.tag_ttl", cache.get("tag_ttl", "60s")),
        offline=parse_bool("cache.offline", cache.get("offline", False)),
        pin_refresh=parse_duration("cache.pin_refresh", cache.get("pin_refresh", "1h")),
        upstreams=upstreams,
        pins=tuple(_pin(i, table) for i, table in _tables(data, "pin")),
        auth=auth,
        access=access,
        default_pull=default_pull,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
    )


_CONNECTION_KEYS = ("max_header_size", "header_timeout", "max_connections", "max_connections_per_client")


def _connection_limits(server: dict[str, Any]) -> dict[str, Any]:
    """The [server] keys that bound what clients can hold: request head size and time, connections."""
    max_header_size = parse_size("server.max_header_size", server.get("max_header_size", "64KiB"))
    if max_header_size < 1024:
        raise ConfigError(f"server.max_header_size: {server['max_header_size']!r} must be at least 1KiB")
    header_timeout = parse_duration("server.header_timeout", server.get("header_timeout", "10s"))
    if header_timeout <= 0:
        raise ConfigError(f"server.header_timeout: {server['header_timeout']!r} must be longer than 0s")
    total = _count("server.max_connections", server.get("max_connections", 1024))
    per_client = _count("server.max_connections_per_client", server.get("max_connections_per_client", 128))
    if per_client > total:
        raise ConfigError(
            f"server.max_connections_per_client: {per_client} is more than server.max_connections ({total})"
        )
    return {
        "max_header_size": max_header_size,
        "header_timeout": header_timeout,
        "max_connections": total,
        "max_connections_per_client": per_client,
    }


def _count(key: str, value: object) -> int:
    """A positive integer, from TOML or an environment variable's digits."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}: {value!r} must be a positive integer")
    return value


_TLS_KEYS = ("tls_cert", "tls_key", "tls_client_ca")


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
    return upstream.name if _PREFIX.fullmatch(upstream.name) else None


# -- access control ----------------------------------------------------------------------


def _networks(key: str, value: object) -> tuple[Network, ...]:
    if not isinstance(value, list):
        raise ConfigError(f'{key}: must be a list of networks, e.g. ["10.0.0.0/8"]')
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not a network such as '10.0.0.0/8' or 'fd00::/8'") from None
    return tuple(networks)


def _strings(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: must be a list of non-empty strings")
    return tuple(value)


def _auth(table: object, environ: dict[str, str]) -> AuthConfig:
    if not isinstance(table, dict):
        raise ConfigError("auth: must be a table ([auth])")
    allowed = {"htpasswd", "user", "token_key_file", "token_key_env", "token_ttl", "default"}
    _check_keys("auth", table, allowed)
    htpasswd = None
    if "htpasswd" in table:
        htpasswd = Path(_string("auth.htpasswd", table["htpasswd"]))
        try:
            text = htpasswd.read_text()
        except OSError as exc:
            raise ConfigError(f"auth.htpasswd: cannot read {htpasswd}: {exc.strerror}") from exc
        try:
            parse_htpasswd(text)
        except ValueError as exc:
            raise ConfigError(f"auth.htpasswd: {exc}") from None
    users = tuple(_user(i, entry) for i, entry in _tables(table, "user", "auth.user"))
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ConfigError(f"auth.user: {next(n for n in names if names.count(n) > 1)!r} is configured twice")
    key = _token_key(table, environ)
    token_ttl = parse_duration("auth.token_ttl", table.get("token_ttl", "5m"))
    if not 60 <= token_ttl <= 86400:
        # Docker clients treat anything shorter as 60 s and would reuse expired tokens.
        raise ConfigError(f"auth.token_ttl: {table['token_ttl']!r} must be between 60s and 1d")
    return AuthConfig(htpasswd=htpasswd, users=users, token_key=key, token_ttl=token_ttl)


def _token_key(table: dict[str, Any], environ: dict[str, str]) -> bytes | None:
    """The key that signs tokens, from a file or a variable; None to generate one."""
    if "token_key_file" in table and "token_key_env" in table:
        raise ConfigError("auth: token_key_file and token_key_env exclude each other")
    if "token_key_file" in table:
        where = "auth.token_key_file"
        path = Path(_string(where, table["token_key_file"]))
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    elif "token_key_env" in table:
        where = "auth.token_key_env"
        variable = _string(where, table["token_key_env"])
        if variable not in environ:
            raise ConfigError(f"{where}: environment variable {variable} is not set")
        key = environ[variable].strip().encode()
    else:
        return None
    if len(key) < MIN_TOKEN_KEY:
        raise ConfigError(f"{where}: the key must be at least {MIN_TOKEN_KEY} bytes (e.g. `openssl rand -hex 32`)")
    return key


def _user(index: int, table: object) -> UserConfig:
    where = f"auth.user[{index}]"
    table = _entry(where, table, "auth.user", {"name", "password_hash", "groups"}, ("name", "password_hash"))
    name = _string(f"{where}.name", table["name"])
    if ":" in name:
        raise ConfigError(f"{where}.name: {name!r} must not contain ':'")
    password_hash = _string(f"{where}.password_hash", table["password_hash"])
    if not _BCRYPT.fullmatch(password_hash):
        raise ConfigError(f"{where}.password_hash: not a bcrypt hash (make one with `htpasswd -nB {name}`)")
    return UserConfig(name, password_hash, _strings(f"{where}.groups", table.get("groups", [])))


def parse_htpasswd(text: str) -> dict[str, str]:
    """`user:bcrypt-hash` lines (what `htpasswd -B` writes); raises ValueError naming the bad line."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not name:
            raise ValueError(f"line {number} is not 'user:hash'")
        if not _BCRYPT.fullmatch(hashed):
            raise ValueError(f"line {number}: {name!r} has no bcrypt hash (write it with `htpasswd -B`)")
        users[name] = hashed
    return users


def _pull(key: str, value: object, auth: AuthConfig | None, certificates: bool = False) -> Pull:
    """`certificates`: client certificates name users (Common Name) and groups (Organization)."""
    if value in (ANYONE, AUTHENTICATED):
        if value == AUTHENTICATED and auth is None and not certificates:
            raise ConfigError(f"{key}: 'authenticated' needs an [auth] section with users")
        return str(value)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: {value!r} must be 'anyone', 'authenticated' or a list of users and 'group:<name>'")
    members = _strings(key, value)
    if members and auth is None and not certificates:
        raise ConfigError(f"{key}: naming users needs an [auth] section")
    known_groups = {g for user in auth.users for g in user.groups} if auth else set()
    for member in members:
        if member.startswith("group:") and member[6:] not in known_groups and not certificates:
            raise ConfigError(f"{key}: no [[auth.user]] is in group {member[6:]!r}")
    return members


def _rule(
    index: int,
    table: object,
    auth: AuthConfig | None,
    upstreams: tuple[UpstreamConfig, ...],
    certificates: bool = False,
) -> AccessRule:
    where = f"access[{index}]"
    table = _entry(where, table, "access", {"repository", "pull", "networks"}, ("repository", "pull"))
    pattern = _string(f"{where}.repository", table["repository"])
    if not _PATTERN.fullmatch(pattern) or any("**" in c and c != "**" for c in pattern.split("/")):
        raise ConfigError(
            f"{where}.repository: {pattern!r} is not a pattern such as 'docker.io/library/*' or 'ghcr.io/acme/**'"
            " (lower case; '**' only as a whole component)"
        )
    first, _, rest = pattern.partition("/")
    if first in DOCKER_HUB_ALIASES:
        pattern = f"{DOCKER_HUB}/{rest}" if rest else DOCKER_HUB
    elif "*" not in first:
        names = {DOCKER_HUB if u.is_docker_hub else u.name for u in upstreams}
        if first not in names:
            raise ConfigError(
                f"{where}.repository: {first!r} is not a configured upstream (known: {', '.join(sorted(names))})"
            )
    return AccessRule(
        repository=pattern,
        pull=_pull(f"{where}.pull", table["pull"], auth, certificates),
        networks=_networks(f"{where}.networks", table.get("networks", [])),
    )
