"""Configuration: defaults without a file, one clear message per mistake, env overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy import config, registries


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pullproxy.toml"
    path.write_text(text)
    return path


def test_no_file_means_docker_hub_on_port_5000_with_10gib_cache() -> None:
    loaded = config.load(None, environ={})
    assert (loaded.listen_host, loaded.listen_port) == ("0.0.0.0", 5000)
    assert loaded.cache_dir == Path("pullproxy-data")
    assert loaded.max_size == 10 * 1024**3
    assert loaded.default_upstream is not None
    assert loaded.default_upstream.name == "docker.io"
    assert loaded.default_upstream.url == "https://registry-1.docker.io"


def test_example_config_loads() -> None:
    loaded = config.load(Path(__file__).parents[2] / "config.example.toml", environ={})
    assert loaded.tag_ttl == 60


def test_sizes_and_durations_parse_with_units(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, '[cache]\nmax_size = "500MiB"\ntag_ttl = "5m"\n'), environ={})
    assert loaded.max_size == 500 * 1024**2
    assert loaded.tag_ttl == 300


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[cache]\nmax_size = "10XB"\n', "cache.max_size"),
        ('[cache]\ntag_ttl = "soon"\n', "cache.tag_ttl"),
        ('[server]\nlisten = "nowhere"\n', "server.listen"),
        ("[server]\nlisten_port = 5\n", "server.listen_port"),
        ('[[upstream]]\nname = "x.io"\n', "upstream[0].url"),
        ('[[upstream]]\nname = "x.io"\nurl = "ftp://x"\n', "upstream[0].url"),
        ('[[upstream]]\nname = "a:5000"\nurl = "http://a:5000"\nprefix = "Bad/Prefix"\n', "upstream[0].prefix"),
        ('[[upstream]]\nname = "x.io"\nurl = "http://x"\npassword_env = "PULLPROXY_TEST_UNSET"\n', "password_env"),
        (
            '[[upstream]]\nname = "a.io"\nurl = "http://a"\ndefault = true\n'
            '[[upstream]]\nname = "b.io"\nurl = "http://b"\ndefault = true\n',
            "default",
        ),
        (
            '[[upstream]]\nname = "docker.io"\nurl = "http://a"\n[[upstream]]\nname = "index.docker.io"\nurl = "http://b"\n',
            "configured twice",
        ),
        ("[cache\n", "not valid TOML"),
        ('[cache]\noffline = "maybe"\n', "cache.offline"),
        ('[[pin]]\nimage = "Not An Image"\n', "pin[0].image"),
        ('[[pin]]\nimage = "alpine"\nplatforms = ["amd64"]\n', "pin[0].platforms"),
        ('[storage]\nbackend = "nfs"\n', "storage.backend"),
        ('[storage]\nbackend = "s3"\nbucket = "b"\n', "storage.endpoint"),
        ('[storage]\nbackend = "s3"\nendpoint = "http://s3:8333"\nbucket = "b"\n', "storage.backend: .*coordination"),
        ("[storage]\nredirect = true\n", "storage.redirect"),
        (
            '[storage]\nbackend = "s3"\nendpoint = "http://s3"\nbucket = "b"\naccess_key_env = "NOPE"\n',
            "NOPE is not set",
        ),
        ('[coordination]\nredis = "10.0.0.9:6379"\n', "coordination.redis"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(config.ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        config.load(write(tmp_path, text), environ={})


def test_s3_storage_takes_its_secrets_from_the_environment(tmp_path: Path) -> None:
    text = (
        '[storage]\nbackend = "s3"\nendpoint = "http://127.0.0.1:8333"\nbucket = "pp"\n'
        'access_key_env = "AK"\nsecret_key_env = "SK"\n'
        '[coordination]\nredis = "redis://127.0.0.1:6379/0"\npeer_secret_env = "PS"\n'
    )
    loaded = config.load(write(tmp_path, text), environ={"AK": "AKVALUE", "SK": "SKVALUE", "PS": "PSVALUE"})
    assert loaded.storage.backend is config.Backend.S3
    assert (loaded.storage.access_key, loaded.storage.secret_key) == ("AKVALUE", "SKVALUE")
    assert loaded.coordination is not None and loaded.coordination.peer_secret == "PSVALUE"
    assert "SKVALUE" not in repr(loaded) and "PSVALUE" not in repr(loaded)


def test_disk_storage_is_the_default() -> None:
    assert config.load(None, environ={}).storage.backend is config.Backend.DISK


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[cache]\nmax_size = "1GiB"\n')
    loaded = config.load(
        path, environ={"PULLPROXY_CACHE_MAX_SIZE": "2GiB", "PULLPROXY_SERVER_LISTEN": "127.0.0.1:6000"}
    )
    assert loaded.max_size == 2 * 1024**3
    assert (loaded.listen_host, loaded.listen_port) == ("127.0.0.1", 6000)


def test_pins_and_offline_mode(tmp_path: Path) -> None:
    text = '[cache]\npin_refresh = "30m"\n[[pin]]\nimage = "docker.io/library/python:3.12"\n'
    text += 'platforms = ["linux/amd64"]\n'
    loaded = config.load(write(tmp_path, text), environ={"PULLPROXY_CACHE_OFFLINE": "true"})
    assert loaded.offline and loaded.pin_refresh == 1800
    assert loaded.pins == (config.PinConfig(image="docker.io/library/python:3.12", platforms=("linux/amd64",)),)


def test_password_env_reads_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[[upstream]]\nname = "x.io"\nurl = "http://x"\nusername = "u"\npassword_env = "PW"\n')
    assert config.load(path, environ={"PW": "s3cret"}).upstreams[0].password == "s3cret"


def test_name_with_port_has_no_implicit_prefix(tmp_path: Path) -> None:
    path = write(tmp_path, '[[upstream]]\nname = "registry.example:5000"\nurl = "http://x"\n')
    upstream = config.load(path, environ={}).upstreams[0]
    assert registries.effective_prefix(upstream) is None


def test_serve_with_bad_config_exits_with_one_clear_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[cache]\nmax_size = "lots"\n')
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pullproxy: configuration error: cache.max_size: 'lots' is not a size such as '10GiB' or '500MiB'"
    ]
