"""Configuration: built-in defaults, an optional TOML file, then environment overrides.

Each table of the file is a frozen pydantic model whose fields are its keys; a key's type
says how its value is read (`Size`, `Duration`, `Flag`, ... below), and a key no model
has is refused. `PULLPROXY_<SECTION>_<KEY>` variables override `[server]` and `[cache]`
keys (a pydantic-settings source). Every problem stops start-up as one `ConfigError`
naming the key, such as `upstream[1].url: ...`, so a person can act on it.

To add a key, add one field to the model of its table, e.g. in `Server`:
`header_timeout: Duration = 10.0`; it is then `config.header_timeout` (keys of `[server]`
and `[cache]` are attributes of `Config` itself), `upstream.header_timeout` for an
`UpstreamConfig`. Document it in config.example.toml and the README.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy import references, units
from proxy.access.policy import ANYONE, AUTHENTICATED, Network, Pull
from proxy.access.users import is_bcrypt, parse_htpasswd
from proxy.registries import DOCKER_HUB, DOCKER_HUB_ALIASES, effective_prefix, is_component, is_docker_hub
from proxy.tls.files import Role, TLSFileError, check_server_files, check_upstream_files

ENV_PREFIX = "PULLPROXY_"
MIN_TOKEN_KEY = 32  # bytes: HS256 wants a key at least as long as its hash
# Matched with fullmatch: `$` would admit a final "\n".
_PATTERN = re.compile(r"(\*\*|[a-z0-9._:*-]+)(/(\*\*|[a-z0-9._:*-]+))*")
# The variables `password_env` and `token_key_env` name, while `load` validates.
_environ: ContextVar[Mapping[str, str]] = ContextVar("environ", default=os.environ)
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, phrased as `key: problem`."""


class Problem(ValueError):
    """A validator's complaint; `at` names the key it is about, below the one being validated."""

    def __init__(self, message: str, *at: str | int) -> None:
        super().__init__(message)
        self.at = at


class NotATable(Problem):
    def __init__(self, *at: str | int) -> None:
        super().__init__("must be a table", *at)


class NotAnArray(Problem):
    def __init__(self, *at: str | int) -> None:
        super().__init__("must be an array of tables", *at)


# -- value types: what TOML (or, for [server] and [cache], a variable's text) may say ----


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise Problem("must be a non-empty string")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise Problem("must be true or false")
    return value


def _flag(value: object) -> bool:
    """TOML booleans, and their spellings in environment variables."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise Problem(f"{value!r} must be true or false")


def _count(value: object) -> int:
    """A positive integer, also as a variable's digits."""
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise Problem(f"{value!r} must be a positive integer")
    return value


def _comma_separated(value: object) -> object:
    """A list as a variable gives it: `a, b`."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _networks(value: object) -> tuple[Network, ...]:
    if not isinstance(value, list | tuple):
        raise Problem('must be a list of networks, e.g. ["10.0.0.0/8"]')
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise Problem(f"{item!r} is not a network such as '10.0.0.0/8' or 'fd00::/8'") from None
    return tuple(networks)


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise Problem("must be a list of non-empty strings")
    return tuple(value)


def _log_format(value: object) -> str:
    if value not in ("auto", "json", "console"):
        raise Problem(f"{value!r} must be 'auto', 'json' or 'console'")
    return str(value)


class Listen(NamedTuple):
    host: str
    port: int


def _listen(value: object) -> Listen:
    if isinstance(value, Listen):
        return value
    host, sep, port = str(value).rpartition(":")
    if not sep or not re.fullmatch("[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise Problem(f"{value!r} is not 'host:port', e.g. '0.0.0.0:5000'")
    return Listen(host.strip("[]") or "0.0.0.0", int(port))


def _tables(value: object) -> object:
    if not isinstance(value, list | tuple):
        raise NotAnArray()
    return value


Text = Annotated[str, BeforeValidator(_text)]  # a non-empty string


def _pathname(value: object) -> Path:
    return value if isinstance(value, Path) else Path(_text(value))


Pathname = Annotated[Path, BeforeValidator(_pathname)]
Size = Annotated[int, BeforeValidator(units.parse_size)]  # bytes, from 10GiB, 500MB, ...
Duration = Annotated[float, BeforeValidator(units.parse_duration)]  # seconds, from 30s, 5m, 1h, ...
Bool = Annotated[bool, BeforeValidator(_bool)]  # a TOML boolean
Flag = Annotated[bool, BeforeValidator(_flag)]  # a TOML boolean, or true/false, yes/no, 1/0 in a variable
Count = Annotated[int, BeforeValidator(_count)]  # 1 or more
Networks = Annotated[tuple[Network, ...], BeforeValidator(_networks)]
NetworkList = Annotated[Networks, BeforeValidator(_comma_separated)]  # also "10.0.0.0/8, fd00::/8"
Strings = Annotated[tuple[str, ...], BeforeValidator(_strings)]
Tables = Annotated[tuple[T, ...], BeforeValidator(_tables)]  # [[table]]


def _variable(value: object, key: str) -> str:
    """The value of the environment variable that `key` names."""
    try:
        variable = _text(value)
    except Problem as exc:
        raise Problem(str(exc), key) from None
    environ = _environ.get()
    if variable not in environ:
        raise Problem(f"environment variable {variable} is not set", key)
    return environ[variable]


# -- tables --------------------------------------------------------------------------------


def _keys(model: type[BaseModel]) -> list[str]:
    """The keys of a table: its fields, by the names the file uses."""
    return sorted(field.alias or name for name, field in model.model_fields.items())


class Table(BaseModel):
    """A table of the file (`[name]` or one `[[name]]`): its fields are its keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _table(cls, data: object) -> object:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise NotATable()
        known = _keys(cls)
        for key in data:
            if key not in known:
                raise Problem(f"unknown key (known: {', '.join(known)})", key)
        return cls._resolve(data)

    @classmethod
    def _resolve(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Values from elsewhere (an environment variable) that the file only names."""
        return data


def _url(value: object) -> str:
    url = _text(value).rstrip("/")
    if not re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", url):
        raise Problem(f"{url!r} must start with http:// or https://")
    return url


def _redis_url(value: object) -> str:
    url = _text(value)
    if not re.fullmatch(r"rediss?://\S+|unix://\S+", url):
        raise Problem(f"{url!r} must be a redis:// (rediss://, unix://) URL, e.g. 'redis://10.0.0.9:6379/0'")
    return url


def _prefix(value: object) -> str:
    if not is_component(_text(value)):
        raise Problem(f"{value!r} must be one repository path component, e.g. 'internal'")
    return str(value)


def _tls_files(keys: Mapping[Role, tuple[str, ...]], check: Callable[[], None]) -> None:
    """Run a TLS file check; its complaint names the key of the file it is about."""
    try:
        check()
    except TLSFileError as exc:
        raise Problem(str(exc), *keys[exc.role]) from None


class UpstreamConfig(Table):
    """One `[[upstream]]`: a registry to mirror."""

    name: Annotated[str, BeforeValidator(_text), AfterValidator(str.lower)]
    url: Annotated[str, BeforeValidator(_url)]
    default: Bool = False
    prefix: Annotated[str, BeforeValidator(_prefix)] | None = None
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    password_env: Text | None = None  # the variable that holds the password
    timeout: Duration = 30.0
    connect_timeout: Duration = 5.0
    max_connections: Count = 64
    ca_file: Pathname | None = None  # trusted in addition to the operating system's store
    client_cert: Pathname | None = None  # mutual TLS towards the upstream, with client_key
    client_key: Pathname | None = None
    insecure_skip_verify: Bool = False

    @property
    def is_docker_hub(self) -> bool:
        return is_docker_hub(self.name)

    @classmethod
    def _resolve(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "password_env" in data:
            return {**data, "password": _variable(data["password_env"], "password_env")}
        return data

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise Problem("username and password (or password_env) go together")
        return self

    @model_validator(mode="after")
    def _tls(self) -> Self:
        if (self.client_cert is None) != (self.client_key is None):
            raise Problem("client_cert and client_key go together")
        if self.insecure_skip_verify and self.ca_file is not None:
            raise Problem("insecure_skip_verify = true ignores ca_file; keep one of them")
        keys = {Role.CA: ("ca_file",), Role.CERTIFICATE: ("client_cert",), Role.KEY: ("client_key",)}
        _tls_files(keys, lambda: check_upstream_files(self.ca_file, self.client_cert, self.client_key))
        return self


DEFAULT_UPSTREAM = UpstreamConfig(name=DOCKER_HUB, url="https://registry-1.docker.io", default=True)


def _image(value: object) -> str:
    references.parse(_text(value))  # its ValueError names what is wrong
    return str(value)


def _platforms(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise Problem('must be a non-empty list such as ["linux/amd64"]')
    for platform in value:
        if not isinstance(platform, str) or not references.valid_platform(platform):
            raise Problem(f"{platform!r} is not 'os/arch' or 'os/arch/variant'")
    return tuple(value)


class PinConfig(Table):
    """One `[[pin]]`: an image kept in the cache and refreshed."""

    image: Annotated[str, BeforeValidator(_image)]  # a full reference, e.g. "docker.io/library/python:3.12"
    platforms: Annotated[tuple[str, ...], BeforeValidator(_platforms)] | None = None  # None: every platform


def _user_name(value: object) -> str:
    if ":" in _text(value):
        raise Problem(f"{value!r} must not contain ':'")
    return str(value)


class UserConfig(Table):
    """One `[[auth.user]]`: someone who may log in, with a bcrypt hash of their password."""

    name: Annotated[str, BeforeValidator(_user_name)]
    password_hash: str = Field(repr=False)
    groups: Strings = ()

    @field_validator("password_hash", mode="before")
    @classmethod
    def _bcrypt(cls, value: object, info: ValidationInfo) -> str:
        if not is_bcrypt(_text(value)):
            name = info.data.get("name", "USER")
            raise Problem(f"not a bcrypt hash (make one with `htpasswd -nB {name}`)")
        return str(value)


def _htpasswd(value: object) -> Path:
    path = Path(_text(value))
    try:
        text = path.read_text()
    except OSError as exc:
        raise Problem(f"cannot read {path}: {exc.strerror}") from exc
    parse_htpasswd(text)  # its ValueError names the bad line
    return path


def _token_ttl(value: object) -> float:
    seconds = units.parse_duration(value)
    if not 60 <= seconds <= 86400:
        # Docker clients treat anything shorter as 60 s and would reuse expired tokens.
        raise Problem(f"{value!r} must be between 60s and 1d")
    return seconds


def _pull(value: object) -> Pull:
    """Who may pull; which users and groups exist is checked against `[auth]` by `Config`."""
    if value in (ANYONE, AUTHENTICATED):
        return str(value)
    if not isinstance(value, list | tuple):
        raise Problem(f"{value!r} must be 'anyone', 'authenticated' or a list of users and 'group:<name>'")
    return _strings(value)


PullRule = Annotated[Pull, BeforeValidator(_pull)]


class AuthConfig(Table):
    """`[auth]`: who may log in, and the tokens they are given."""

    htpasswd: Annotated[Path, BeforeValidator(_htpasswd)] | None = None
    users: Tables[UserConfig] = Field(default=(), alias="user")
    token_key_file: Pathname | None = None
    token_key_env: Text | None = None
    token_ttl: Annotated[float, BeforeValidator(_token_ttl)] = 300.0
    default: PullRule = ()  # for repositories no [[access]] rule matches: nobody
    _token_key: bytes | None = PrivateAttr(None)

    @property
    def token_key(self) -> bytes | None:
        """The key that signs tokens; None: one is generated into the cache dir."""
        return self._token_key

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            raise Problem(f"{next(n for n in names if names.count(n) > 1)!r} is configured twice", "user")
        self._token_key = self._read_token_key()
        return self

    def _read_token_key(self) -> bytes | None:
        if self.token_key_file is not None and self.token_key_env is not None:
            raise Problem("token_key_file and token_key_env exclude each other")
        if self.token_key_file is not None:
            where = "token_key_file"
            try:
                key = self.token_key_file.read_bytes().strip()
            except OSError as exc:
                raise Problem(f"cannot read {self.token_key_file}: {exc.strerror}", where) from exc
        elif self.token_key_env is not None:
            where = "token_key_env"
            key = _variable(self.token_key_env, where).strip().encode()
        else:
            return None
        if len(key) < MIN_TOKEN_KEY:
            raise Problem(f"the key must be at least {MIN_TOKEN_KEY} bytes (e.g. `openssl rand -hex 32`)", where)
        return key


def _check_pull(pull: Pull, auth: AuthConfig | None, certificates: bool, *at: str | int) -> None:
    """`certificates`: client certificates name users (Common Name) and groups (Organization) too."""
    if pull == AUTHENTICATED and auth is None and not certificates:
        raise Problem("'authenticated' needs an [auth] section with users", *at)
    if isinstance(pull, str) or certificates:
        return
    if pull and auth is None:
        raise Problem("naming users needs an [auth] section", *at)
    known_groups = {group for user in auth.users for group in user.groups} if auth else set()
    for member in pull:
        if member.startswith("group:") and member[6:] not in known_groups:
            raise Problem(f"no [[auth.user]] is in group {member[6:]!r}", *at)


def _glob(value: object) -> str:
    pattern = _text(value)
    if not _PATTERN.fullmatch(pattern) or any("**" in c and c != "**" for c in pattern.split("/")):
        raise Problem(
            f"{pattern!r} is not a pattern such as 'docker.io/library/*' or 'ghcr.io/acme/**'"
            " (lower case; '**' only as a whole component)"
        )
    first, _, rest = pattern.partition("/")
    if first in DOCKER_HUB_ALIASES:  # Docker Hub under one name
        return f"{DOCKER_HUB}/{rest}" if rest else DOCKER_HUB
    return pattern


class AccessRule(Table):
    """One `[[access]]`: who may pull (push, delete) the repositories a glob matches (see proxy.access)."""

    repository: Annotated[str, BeforeValidator(_glob)]  # on "<upstream>/<repository>", or a hosted name
    pull: PullRule
    networks: Networks = ()
    push: PullRule | None = None  # hosted repositories only; None: nobody with [auth], anyone without
    delete: PullRule | None = None


def _hosted_glob(value: object) -> str:
    pattern = _text(value)
    if not _PATTERN.fullmatch(pattern) or ":" in pattern or any("**" in c and c != "**" for c in pattern.split("/")):
        raise Problem(f"{pattern!r} is not a repository pattern such as 'acme/**' or 'charts/*'")
    return pattern


class Hosted(Table):
    """`[hosted]`: repositories clients push to, kept in the cache directory and never evicted (proxy.hosted)."""

    repositories: tuple[Annotated[str, BeforeValidator(_hosted_glob)], ...] = ()
    max_repositories: Count = 500
    max_size: Size = 500 << 30  # all hosted content and uploads in progress, apart from [cache] max_size
    max_manifests_per_repository: Count = 100000
    upload_ttl: Annotated[float, BeforeValidator(units.parse_duration)] = 3600.0


class Backend(enum.StrEnum):
    DISK = "disk"  # the cache directory: one host, nothing else to run
    S3 = "s3"  # an S3-compatible bucket shared by replicas, with [coordination]


def _backend(value: object) -> Backend:
    try:
        return Backend(_text(value))
    except ValueError:
        raise Problem(f"{value!r} must be 'disk' or 's3'") from None


class Storage(Table):
    """`[storage]`: where content lives. "s3": a bucket every replica shares; `[cache] dir` is then
    each replica's local hot tier (bounded by `[cache] local_max_size`), `[cache] max_size` bounds
    the cached content in the bucket."""

    backend: Annotated[Backend, BeforeValidator(_backend)] = Backend.DISK
    endpoint: Annotated[str, BeforeValidator(_url)] | None = None
    bucket: Text | None = None
    region: Text = "us-east-1"
    access_key_env: Text | None = None
    secret_key_env: Text | None = None
    access_key: str | None = Field(default=None, repr=False)
    secret_key: str | None = Field(default=None, repr=False)
    redirect: Bool = False  # blob GETs answer 307 to a short-lived presigned URL

    @classmethod
    def _resolve(cls, data: dict[str, Any]) -> dict[str, Any]:
        for name in ("access_key", "secret_key"):
            if f"{name}_env" in data:
                data = {**data, name: _variable(data[f"{name}_env"], f"{name}_env")}
        return data

    @model_validator(mode="after")
    def _s3(self) -> Self:
        if self.backend is Backend.S3:
            for key in ("endpoint", "bucket"):
                if getattr(self, key) is None:
                    raise Problem('missing (needed with backend = "s3")', key)
        elif self.redirect:
            raise Problem('redirect = true needs backend = "s3"', "redirect")
        return self


class Coordination(Table):
    """`[coordination]`: the Redis every replica shares, and how replicas reach and trust each other."""

    redis: Annotated[str, BeforeValidator(_redis_url)]
    advertise_url: Annotated[str, BeforeValidator(_url)] | None = None  # None: http://<listen host:port>
    peer_secret_env: Text | None = None
    peer_secret: str | None = Field(default=None, repr=False)

    @classmethod
    def _resolve(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "peer_secret_env" in data:
            return {**data, "peer_secret": _variable(data["peer_secret_env"], "peer_secret_env")}
        return data


# -- the whole file ------------------------------------------------------------------------


def _at_least_1kib(size: int) -> int:
    if size < 1024:
        raise Problem(f"{size!r} must be at least 1KiB")
    return size


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise Problem(f"{seconds!r} must be longer than 0s")
    return seconds


class Server(BaseModel):
    """The keys of `[server]`, also `PULLPROXY_SERVER_<KEY>`."""

    listen: Annotated[Listen, BeforeValidator(_listen)] = Listen("0.0.0.0", 5000)
    workers: Count = 1
    log_format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_log_format)] = "auto"
    trusted_proxies: NetworkList = ()
    # Bounds on what a client can hold (see proxy.http.server).
    max_header_size: Annotated[int, BeforeValidator(units.parse_size), AfterValidator(_at_least_1kib)] = 64 << 10
    header_timeout: Annotated[float, BeforeValidator(units.parse_duration), AfterValidator(_positive)] = 10.0
    max_connections: Count = 1024
    max_connections_per_client: Count = 128
    tls_cert: Pathname | None = None  # with tls_key: the listener speaks HTTPS
    tls_key: Pathname | None = None
    tls_client_ca: Pathname | None = None  # clients must present a certificate this CA signed

    @model_validator(mode="after")
    def _connections(self) -> Self:
        if self.max_connections_per_client > self.max_connections:
            raise Problem(
                f"{self.max_connections_per_client} is more than server.max_connections ({self.max_connections})",
                "server",
                "max_connections_per_client",
            )
        return self

    @model_validator(mode="after")
    def _tls(self) -> Self:
        """`tls_cert` and `tls_key` turn HTTPS on; a pair that would not load stops start-up here."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise Problem("tls_cert and tls_key go together", "server")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise Problem("needs tls_cert and tls_key (client certificates need TLS)", "server", "tls_client_ca")
        if self.tls_cert is not None and self.tls_key is not None:
            cert, key, client_ca = self.tls_cert, self.tls_key, self.tls_client_ca
            keys = {
                Role.CA: ("server", "tls_client_ca"),
                Role.CERTIFICATE: ("server", "tls_cert"),
                Role.KEY: ("server", "tls_key"),
            }
            _tls_files(keys, lambda: check_server_files(cert, key, client_ca))
        return self

    @property
    def listen_host(self) -> str:
        return self.listen.host

    @property
    def listen_port(self) -> int:
        return self.listen.port


class Cache(BaseModel):
    """The keys of `[cache]`, also `PULLPROXY_CACHE_<KEY>`."""

    cache_dir: Pathname = Field(default=Path("pullproxy-data"), alias="dir")
    max_size: Size = 10 << 30
    local_max_size: Size | None = None  # with [storage] backend = "s3": this host's hot tier; None: max_size
    tag_ttl: Duration = 60.0
    offline: Flag = False
    pin_refresh: Duration = 3600.0


SECTIONS: dict[str, type[BaseModel]] = {"server": Server, "cache": Cache}
_SECTION_OF = {key: section for section, model in SECTIONS.items() for key in _keys(model)}


def _upstreams(upstreams: tuple[UpstreamConfig, ...]) -> tuple[UpstreamConfig, ...]:
    return upstreams or (DEFAULT_UPSTREAM,)


class Environment(PydanticBaseSettingsSource):
    """`PULLPROXY_<SECTION>_<KEY>` variables as `[section] key` values, e.g. PULLPROXY_CACHE_MAX_SIZE."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # values are found per section, in __call__

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for section in SECTIONS:
            head = f"{ENV_PREFIX}{section.upper()}_"
            table = {name[len(head) :].lower(): v for name, v in self.environ.items() if name.startswith(head)}
            if table:
                values[section] = table
        return values


class Config(BaseSettings, Cache, Server):
    """What the file and the environment say; `[server]` and `[cache]` keys are attributes of their own."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", case_sensitive=True, validate_default=False, populate_by_name=True
    )

    upstreams: Annotated[Tables[UpstreamConfig], AfterValidator(_upstreams)] = Field(
        default=(DEFAULT_UPSTREAM,), alias="upstream"
    )
    pins: Tables[PinConfig] = Field(default=(), alias="pin")
    auth: AuthConfig | None = None
    access: Tables[AccessRule] = ()
    hosted: Hosted | None = None
    storage: Storage = Storage()
    coordination: Coordination | None = None

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)

    @property
    def default_pull(self) -> Pull:
        """Who may pull what no `[[access]]` rule matches: anyone without `[auth]`, else `auth.default`."""
        return ANYONE if self.auth is None else self.auth.default

    @classmethod
    def top_level_keys(cls) -> list[str]:
        """The top-level keys of the file."""
        sections = {name for model in SECTIONS.values() for name in model.model_fields}
        return sorted([*SECTIONS, *(f.alias or n for n, f in cls.model_fields.items() if n not in sections)])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment over the file (the file's values are the init arguments)."""
        return Environment(settings_cls, _environ.get()), init_settings

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        """The keys of `[server]` and `[cache]` become attributes."""
        data = dict(data)
        for section, model in SECTIONS.items():
            table = data.pop(section, {})
            if not isinstance(table, dict):
                raise NotATable(section)
            known = _keys(model)
            for key in table:
                if key not in known:
                    raise Problem(f"unknown key (known: {', '.join(known)})", section, key)
            data.update(table)
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        """What one table cannot know alone: upstreams among each other, rules against upstreams and users."""
        if sum(u.default for u in self.upstreams) > 1:
            raise Problem("only one upstream may have default = true", "upstream")
        names: set[str] = set()
        prefixes: set[str] = set()
        for index, upstream in enumerate(self.upstreams):
            aliases = DOCKER_HUB_ALIASES if upstream.is_docker_hub else {upstream.name}
            if names & aliases:
                raise Problem(f"{upstream.name!r} is configured twice", "upstream", index, "name")
            names |= aliases
            prefix = effective_prefix(upstream)
            if prefix is not None:
                if prefix in prefixes:
                    raise Problem(f"{prefix!r} is used by another upstream", "upstream", index, "prefix")
                prefixes.add(prefix)
        known = sorted({DOCKER_HUB if u.is_docker_hub else u.name for u in self.upstreams})
        hosted_firsts = {p.partition("/")[0] for p in self.hosted.repositories} if self.hosted else set()
        for index, rule in enumerate(self.access):
            first = rule.repository.partition("/")[0]
            hosted = first in hosted_firsts or "*" in "".join(hosted_firsts)
            if "*" not in first and first not in DOCKER_HUB_ALIASES and first not in known and not hosted:
                raise Problem(
                    f"{first!r} is not a configured upstream (known: {', '.join(known)})", "access", index, "repository"
                )
            _check_pull(rule.pull, self.auth, self.tls_client_ca is not None, "access", index, "pull")
            for action in ("push", "delete"):
                who = getattr(rule, action)
                if who is not None:
                    _check_pull(who, self.auth, self.tls_client_ca is not None, "access", index, action)
        if self.storage.backend is Backend.S3 and self.coordination is None:
            raise Problem('backend = "s3" needs [coordination] redis (replicas share its index)', "storage", "backend")
        if self.auth is not None:
            _check_pull(self.auth.default, self.auth, self.tls_client_ca is not None, "auth", "default")
        return self


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    known = Config.top_level_keys()
    for key in data:
        if key not in known:
            raise ConfigError(f"(top level).{key}: unknown key (known: {', '.join(known)})")
    token = _environ.set(dict(os.environ if environ is None else environ))
    try:
        return Config(**data)
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors()[0])) from None
    finally:
        _environ.reset(token)


def _message(error: ErrorDetails) -> str:
    """One of pydantic's errors as `key: problem`, the key dotted as in the file (`upstream[1].url`)."""
    loc = tuple(error["loc"])
    if loc and loc[0] in _SECTION_OF:
        loc = (_SECTION_OF[str(loc[0])], *loc)
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, Problem):
        loc = (*loc, *problem.at)
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    name = "".join(f".{part}" for part in loc if not isinstance(part, int)).lstrip(".")
    if isinstance(problem, NotATable):
        text = f"must be a table ({f'[[{name}]]' if loc and isinstance(loc[-1], int) else f'[{name}]'})"
    elif isinstance(problem, NotAnArray):
        text = f"must be an array of tables ([[{name}]])"
    elif problem is not None:  # raised by a validator: says what is wrong
        text = str(problem)
    elif error["type"] == "missing":
        text = "missing"
    elif error["type"] == "extra_forbidden":
        text = "unknown key"
    else:
        text = f"{error['msg']} (got {error['input']!r})"
    return f"{where}: {text}" if where else text
