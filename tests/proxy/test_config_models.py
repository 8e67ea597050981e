"""The configuration's models, in-process: every key read and refused, environment overrides, unknown keys."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pydantic
import pytest

from proxy import config
from tests.support.auth import password_hash

HASH = password_hash("pw")
UPSTREAM = '[[upstream]]\nname = "x.io"\nurl = "http://x"\n'
USER = f"[[auth.user]]\nname = 'alice'\npassword_hash = '{HASH}'\n"


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Config:
    path = tmp_path / "pullproxy.toml"
    path.write_text(text)
    return config.load(path, environ={} if environ is None else environ)


def problem(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(config.ConfigError) as caught:
        load(tmp_path, text, environ)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "attribute", "expected"),
    [
        ("[server]\nlisten = '127.0.0.1:6000'\n", "listen_host", "127.0.0.1"),
        ("[server]\nlisten = '127.0.0.1:6000'\n", "listen_port", 6000),
        ("[server]\nlisten = '[::1]:6000'\n", "listen_host", "::1"),
        ("[server]\nlisten = ':6000'\n", "listen_host", "0.0.0.0"),
        ("[server]\nworkers = 4\n", "workers", 4),
        ("[server]\nlog_format = 'json'\n", "log_format", "json"),
        ("[server]\ntrusted_proxies = ['10.0.0.1', 'fd00::/8']\n", "trusted_proxies", ("10.0.0.1/32", "fd00::/8")),
        ("[cache]\ndir = '/var/lib/x'\n", "cache_dir", Path("/var/lib/x")),
        ("[cache]\nmax_size = '500MiB'\n", "max_size", 500 << 20),
        ("[cache]\nmax_size = '2GB'\n", "max_size", 2 * 1000**3),
        ("[cache]\nmax_size = 4096\n", "max_size", 4096),
        ("[cache]\ntag_ttl = '5m'\n", "tag_ttl", 300),
        ("[cache]\ntag_ttl = 0\n", "tag_ttl", 0),
        ("[cache]\ntag_ttl = '250ms'\n", "tag_ttl", 0.25),
        ("[cache]\noffline = true\n", "offline", True),
        ("[cache]\noffline = 'Yes'\n", "offline", True),
        ("[cache]\npin_refresh = '2h'\n", "pin_refresh", 7200),
        ("[cache]\npin_refresh = 0\n", "pin_refresh", 0),
    ],
)
def test_server_and_cache_keys_are_read(tmp_path: Path, text: str, attribute: str, expected: object) -> None:
    value = getattr(load(tmp_path, text), attribute)
    if attribute == "trusted_proxies":
        value = tuple(str(network) for network in value)
    assert value == expected


def test_defaults_without_a_file() -> None:
    loaded = config.load(None, environ={})
    assert (loaded.listen_host, loaded.listen_port, loaded.workers, loaded.log_format) == ("0.0.0.0", 5000, 1, "auto")
    assert (loaded.trusted_proxies, loaded.cache_dir, loaded.max_size) == ((), Path("pullproxy-data"), 10 << 30)
    assert (loaded.tag_ttl, loaded.offline, loaded.pin_refresh) == (60, False, 3600)
    assert loaded.upstreams == (config.DEFAULT_UPSTREAM,) and loaded.upstreams[0].is_docker_hub
    assert (loaded.pins, loaded.auth, loaded.access, loaded.default_pull) == ((), None, (), "anyone")


def test_upstream_keys_are_read(tmp_path: Path) -> None:
    text = """[[upstream]]
name = "Registry.Example:5000"
url = "https://registry.example:5000/"
default = true
prefix = "internal"
username = "ci"
password_env = "PW"
timeout = "1m"
connect_timeout = 2
max_connections = 8
[[upstream]]
name = "index.docker.io"
url = "https://registry-1.docker.io"
username = "u"
password = "inline"
"""
    internal, hub = load(tmp_path, text, {"PW": "s3cret"}).upstreams
    assert (internal.name, internal.url, internal.default, internal.prefix) == (
        "registry.example:5000",
        "https://registry.example:5000",
        True,
        "internal",
    )
    assert (internal.username, internal.password, internal.timeout, internal.connect_timeout) == ("ci", "s3cret", 60, 2)
    assert internal.max_connections == 8 and not internal.is_docker_hub
    assert hub.is_docker_hub and hub.password == "inline" and (hub.default, hub.timeout) == (False, 30)
    assert "s3cret" not in repr(internal) and "inline" not in repr(hub)


def test_pin_auth_and_access_keys_are_read(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"carol:{HASH}\n")
    text = f"""[[pin]]
image = "alpine"
[[pin]]
image = "ghcr.io/acme/app:1.2"
platforms = ["linux/amd64", "linux/arm64/v8"]
[auth]
htpasswd = "{htpasswd}"
token_key_env = "KEY"
token_ttl = "10m"
default = ["group:dev"]
{USER}groups = ["dev"]
[[access]]
repository = "registry-1.docker.io/library/*"
pull = "anyone"
[[access]]
repository = "**"
pull = "authenticated"
networks = ["10.0.0.0/8"]
"""
    loaded = load(tmp_path, text, {"KEY": " " + "k" * 40 + "\n"})
    assert [(pin.image, pin.platforms) for pin in loaded.pins] == [
        ("alpine", None),
        ("ghcr.io/acme/app:1.2", ("linux/amd64", "linux/arm64/v8")),
    ]
    auth = loaded.auth
    assert auth is not None and auth.htpasswd == htpasswd and auth.token_ttl == 600
    assert auth.token_key == b"k" * 40 and "kkkk" not in repr(auth)
    assert [(u.name, u.password_hash, u.groups) for u in auth.users] == [("alice", HASH, ("dev",))]
    assert loaded.default_pull == ("group:dev",)
    assert [(r.repository, r.pull, r.networks) for r in loaded.access] == [
        ("docker.io/library/*", "anyone", ()),
        ("**", "authenticated", (ipaddress.ip_network("10.0.0.0/8"),)),
    ]


def test_token_key_from_a_file_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k" * 40 + "\n")
    loaded = load(tmp_path, f"[auth]\ntoken_key_file = '{tmp_path / 'key'}'\n")
    assert loaded.auth is not None and loaded.auth.token_key == b"k" * 40


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nlisten = 'nowhere'\n", "server.listen: 'nowhere' is not 'host:port', e.g. '0.0.0.0:5000'"),
        ("[server]\nlisten = 'a:65536'\n", "server.listen: 'a:65536' is not 'host:port', e.g. '0.0.0.0:5000'"),
        ("[server]\nworkers = 0\n", "server.workers: 0 must be a positive integer"),
        ("[server]\nworkers = 'many'\n", "server.workers: 'many' must be a positive integer"),
        ("[server]\nlog_format = 'xml'\n", "server.log_format: 'xml' must be 'auto', 'json' or 'console'"),
        (
            "[server]\ntrusted_proxies = 'x'\n",
            "server.trusted_proxies: 'x' is not a network such as '10.0.0.0/8' or 'fd00::/8'",
        ),
        ("[server]\ntrusted_proxies = 8\n", 'server.trusted_proxies: must be a list of networks, e.g. ["10.0.0.0/8"]'),
        ("[cache]\ndir = ''\n", "cache.dir: must be a non-empty string"),
        ("[cache]\nmax_size = 'lots'\n", "cache.max_size: 'lots' is not a size such as '10GiB' or '500MiB'"),
        ("[cache]\nmax_size = 0\n", "cache.max_size: 0 is not a size such as '10GiB' or '500MiB'"),
        ("[cache]\ntag_ttl = 'soon'\n", "cache.tag_ttl: 'soon' is not a duration such as '30s', '5m' or '1h'"),
        ("[cache]\ntag_ttl = -1\n", "cache.tag_ttl: -1 is not a duration such as '30s', '5m' or '1h'"),
        ("[cache]\noffline = 'maybe'\n", "cache.offline: 'maybe' must be true or false"),
        ("[cache]\npin_refresh = '1y'\n", "cache.pin_refresh: '1y' is not a duration such as '30s', '5m' or '1h'"),
        ("server = 1\n", "server: must be a table ([server])"),
        ('[[upstream]]\nname = "x.io"\n', "upstream[0].url: missing"),
        ('[[upstream]]\nurl = "http://x"\n', "upstream[0].name: missing"),
        ('[[upstream]]\nname = ""\nurl = "http://x"\n', "upstream[0].name: must be a non-empty string"),
        (
            '[[upstream]]\nname = "x.io"\nurl = "ftp://x"\n',
            "upstream[0].url: 'ftp://x' must start with http:// or https://",
        ),
        (UPSTREAM + "default = 'yes'\n", "upstream[0].default: must be true or false"),
        (
            UPSTREAM + "prefix = 'a/b'\n",
            "upstream[0].prefix: 'a/b' must be one repository path component, e.g. 'internal'",
        ),
        (UPSTREAM + "username = 'u'\n", "upstream[0]: username and password (or password_env) go together"),
        (UPSTREAM + "password = 'p'\n", "upstream[0]: username and password (or password_env) go together"),
        (UPSTREAM + "password_env = 'UNSET'\n", "upstream[0].password_env: environment variable UNSET is not set"),
        (UPSTREAM + "password_env = 5\n", "upstream[0].password_env: must be a non-empty string"),
        (UPSTREAM + "timeout = 'long'\n", "upstream[0].timeout: 'long' is not a duration such as '30s', '5m' or '1h'"),
        (
            UPSTREAM + "connect_timeout = 'x'\n",
            "upstream[0].connect_timeout: 'x' is not a duration such as '30s', '5m' or '1h'",
        ),
        (UPSTREAM + "max_connections = 0\n", "upstream[0].max_connections: 0 must be a positive integer"),
        ("upstream = 5\n", "upstream: must be an array of tables ([[upstream]])"),
        ("upstream = [5]\n", "upstream[0]: must be a table ([[upstream]])"),
        (UPSTREAM + UPSTREAM, "upstream[1].name: 'x.io' is configured twice"),
        (
            UPSTREAM.replace("x.io", "a.io") + "prefix = 'p'\n" + UPSTREAM + "prefix = 'p'\n",
            "upstream[1].prefix: 'p' is used by another upstream",
        ),
        (UPSTREAM + "default = true\n" + UPSTREAM.replace("x.io", "y.io") + "default = true\n", "upstream: only one"),
        ("[[pin]]\nplatforms = ['linux/amd64']\n", "pin[0].image: missing"),
        ("[[pin]]\nimage = 'Alpine'\n", "pin[0].image: 'Alpine' is not an image reference such as"),
        (
            "[[pin]]\nimage = 'alpine'\nplatforms = []\n",
            'pin[0].platforms: must be a non-empty list such as ["linux/amd64"]',
        ),
        (
            "[[pin]]\nimage = 'alpine'\nplatforms = ['amd64']\n",
            "pin[0].platforms: 'amd64' is not 'os/arch' or 'os/arch/variant'",
        ),
        ("pin = [1]\n", "pin[0]: must be a table ([[pin]])"),
        ("auth = 1\n", "auth: must be a table ([auth])"),
        (
            "[auth]\nhtpasswd = '/nonexistent/htpasswd'\n",
            "auth.htpasswd: cannot read /nonexistent/htpasswd: No such file",
        ),
        ("[auth]\nuser = 1\n", "auth.user: must be an array of tables ([[auth.user]])"),
        ("[auth]\nuser = [1]\n", "auth.user[0]: must be a table ([[auth.user]])"),
        ("[[auth.user]]\nname = 'a'\n", "auth.user[0].password_hash: missing"),
        (
            "[[auth.user]]\nname = 'a'\npassword_hash = 'x'\n",
            "auth.user[0].password_hash: not a bcrypt hash (make one with",
        ),
        ("[[auth.user]]\nname = 'a:b'\npassword_hash = 'x'\n", "auth.user[0].name: 'a:b' must not contain ':'"),
        (USER + "groups = 'dev'\n", "auth.user[0].groups: must be a list of non-empty strings"),
        (USER + USER, "auth.user: 'alice' is configured twice"),
        ("[auth]\ntoken_key_env = 'UNSET'\n", "auth.token_key_env: environment variable UNSET is not set"),
        ("[auth]\ntoken_key_env = 'SHORT'\n", "auth.token_key_env: the key must be at least 32 bytes"),
        ("[auth]\ntoken_key_file = '/nonexistent/key'\n", "auth.token_key_file: cannot read /nonexistent/key: No such"),
        (
            "[auth]\ntoken_key_file = 'k'\ntoken_key_env = 'SHORT'\n",
            "auth: token_key_file and token_key_env exclude each other",
        ),
        ("[auth]\ntoken_ttl = '2d'\n", "auth.token_ttl: '2d' must be between 60s and 1d"),
        ("[auth]\ntoken_ttl = 'x'\n", "auth.token_ttl: 'x' is not a duration such as '30s', '5m' or '1h'"),
        (
            "[auth]\ndefault = 'everyone'\n",
            "auth.default: 'everyone' must be 'anyone', 'authenticated' or a list of users and 'group:<name>'",
        ),
        ("[auth]\ndefault = ['group:ops']\n", "auth.default: no [[auth.user]] is in group 'ops'"),
        ("[[access]]\npull = 'anyone'\n", "access[0].repository: missing"),
        ("[[access]]\nrepository = 'A/*'\npull = 'anyone'\n", "access[0].repository: 'A/*' is not a pattern such as"),
        (
            "[[access]]\nrepository = 'quay.io/**'\npull = 'anyone'\n",
            "access[0].repository: 'quay.io' is not a configured upstream (known: docker.io)",
        ),
        ("[[access]]\nrepository = '**'\npull = 'authenticated'\n", "access[0].pull: 'authenticated' needs an [auth]"),
        ("[[access]]\nrepository = '**'\npull = ['bob']\n", "access[0].pull: naming users needs an [auth] section"),
        ("[[access]]\nrepository = '**'\npull = [1]\n", "access[0].pull: must be a list of non-empty strings"),
        (
            "[[access]]\nrepository = '**'\npull = 'anyone'\nnetworks = ['10.0.0.0/88']\n",
            "access[0].networks: '10.0.0.0/88' is not a network such as '10.0.0.0/8' or 'fd00::/8'",
        ),
        ("access = {}\n", "access: must be an array of tables ([[access]])"),
    ],
)
def test_bad_values_are_refused_in_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    said = problem(tmp_path, text, {"SHORT": "too short"})
    assert said.startswith(message) and "\n" not in said


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "listen = '1:2'\n",
            "(top level).listen: unknown key"
            " (known: access, auth, cache, coordination, hosted, pin, server, storage, upstream)",
        ),
        (
            "[server]\nport = 1\n",
            "server.port: unknown key (known: header_timeout, listen, log_format, max_connections,"
            " max_connections_per_client, max_header_size, tls_cert, tls_client_ca, tls_key, trusted_proxies, workers)",
        ),
        (
            "[cache]\ncache_dir = 'x'\n",
            "cache.cache_dir: unknown key (known: dir, local_max_size, max_size, offline, pin_refresh, tag_ttl)",
        ),
        (
            UPSTREAM + "token = 'x'\n",
            "upstream[0].token: unknown key (known: ca_file, client_cert, client_key, connect_timeout, default,"
            " insecure_skip_verify, max_connections, name, password, password_env, prefix, timeout, url, username)",
        ),
        ("[[pin]]\nimage = 'alpine'\ntag = 'x'\n", "pin[0].tag: unknown key (known: image, platforms)"),
        (
            "[auth]\nusers = []\n",
            "auth.users: unknown key (known: default, htpasswd, token_key_env, token_key_file, token_ttl, user)",
        ),
        ("[auth]\ntoken_key = 'x'\n", "auth.token_key: unknown key"),
        (USER + "group = 'x'\n", "auth.user[0].group: unknown key (known: groups, name, password_hash)"),
        ("[[access]]\nrepository = '**'\npull = 'anyone'\nnetwork = []\n", "access[0].network: unknown key"),
    ],
)
def test_unknown_keys_are_refused_with_the_known_ones(tmp_path: Path, text: str, message: str) -> None:
    assert problem(tmp_path, text).startswith(message)


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("PULLPROXY_SERVER_LISTEN", "127.0.0.1:6000", "listen_port", 6000),
        ("PULLPROXY_SERVER_WORKERS", "3", "workers", 3),
        ("PULLPROXY_SERVER_LOG_FORMAT", "console", "log_format", "console"),
        ("PULLPROXY_SERVER_TRUSTED_PROXIES", "10.0.0.1, fd00::/8", "trusted_proxies", 2),
        ("PULLPROXY_CACHE_DIR", "/data", "cache_dir", Path("/data")),
        ("PULLPROXY_CACHE_MAX_SIZE", "2GiB", "max_size", 2 << 30),
        ("PULLPROXY_CACHE_TAG_TTL", "10s", "tag_ttl", 10),
        ("PULLPROXY_CACHE_OFFLINE", "no", "offline", False),
        ("PULLPROXY_CACHE_OFFLINE", "0", "offline", False),
        ("PULLPROXY_CACHE_PIN_REFRESH", "30m", "pin_refresh", 1800),
    ],
)
def test_every_server_and_cache_key_has_its_variable_and_it_wins_over_the_file(
    tmp_path: Path, variable: str, value: str, attribute: str, expected: object
) -> None:
    text = (
        "[server]\nlisten = '1.2.3.4:1'\nworkers = 2\nlog_format = 'json'\ntrusted_proxies = ['10.9.0.0/16']\n"
        "[cache]\ndir = '/file'\nmax_size = '1GiB'\ntag_ttl = '1h'\noffline = true\npin_refresh = '1d'\n"
    )
    got: Any = getattr(load(tmp_path, text, {variable: value}), attribute)
    assert (len(got) if attribute == "trusted_proxies" else got) == expected
    assert getattr(load(tmp_path, text), attribute) != got  # the file said otherwise


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PULLPROXY_CACHE_MAX_SIZE": "lots"}, "cache.max_size: 'lots' is not a size such as '10GiB' or '500MiB'"),
        ({"PULLPROXY_SERVER_WORKERS": "none"}, "server.workers: 'none' must be a positive integer"),
        ({"PULLPROXY_CACHE_SIZE": "1GiB"}, "cache.size: unknown key (known: dir, local_max_size, max_size"),
        ({"PULLPROXY_SERVER_LISTEN_PORT": "5"}, "server.listen_port: unknown key (known: header_timeout, listen,"),
    ],
)
def test_bad_variables_are_refused_like_keys(tmp_path: Path, environ: dict[str, str], message: str) -> None:
    assert problem(tmp_path, "", environ).startswith(message)


def test_other_variables_are_not_keys(tmp_path: Path) -> None:
    environ = {"PULLPROXY_CONFIG": "/x", "PULLPROXY_TEST_UNSET": "1", "PULLPROXY_UPSTREAM_URL": "http://y", "HOME": "/"}
    assert load(tmp_path, "", environ) == config.load(None, environ={})


def test_an_empty_upstream_array_means_docker_hub(tmp_path: Path) -> None:
    assert load(tmp_path, "upstream = []\n").upstreams == (config.DEFAULT_UPSTREAM,)


def test_models_are_frozen_and_validate_when_made_in_code() -> None:
    upstream = config.UpstreamConfig(name="GHCR.io", url="https://ghcr.io/")
    assert (upstream.name, upstream.url) == ("ghcr.io", "https://ghcr.io")
    with pytest.raises(pydantic.ValidationError):
        upstream.url = "http://elsewhere"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="must start with http"):
        config.UpstreamConfig(name="x", url="x")
    loaded = config.load(None, environ={})
    with pytest.raises(pydantic.ValidationError):
        loaded.max_size = 1  # type: ignore[misc]


def test_a_file_that_cannot_be_read_or_parsed_is_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"nothing\.toml: cannot read: No such file"):
        config.load(tmp_path / "nothing.toml", environ={})
    assert problem(tmp_path, "[cache\n").endswith(
        "pullproxy.toml: not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"
    )
