"""Access rules without a server: glob semantics, first match wins, the default, config mistakes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy import config
from proxy.access.gate import client_address
from proxy.access.policy import ANYONE, Policy, Pull, User
from tests.support.auth import password_hash

ALICE = User("alice", frozenset({"dev"}))
BOB = User("bob")


def rules(*entries: tuple[str, Pull]) -> list[config.AccessRule]:
    return [config.AccessRule(repository=pattern, pull=pull) for pattern, pull in entries]


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("docker.io/library/*", "docker.io/library/alpine", True),
        ("docker.io/library/*", "docker.io/library/team/alpine", False),  # * is one component
        ("docker.io/library/*", "docker.io/libraryx/alpine", False),
        ("ghcr.io/acme/**", "ghcr.io/acme/app", True),
        ("ghcr.io/acme/**", "ghcr.io/acme/team/deep/app", True),
        ("ghcr.io/acme/**", "ghcr.io/acme", True),  # ** may stand for no component
        ("ghcr.io/acme/**", "ghcr.io/acmecorp/app", False),
        ("*/internal/**", "registry.example:5000/internal/app", True),
        ("*/internal/**", "ghcr.io/team/internal/app", False),
        ("**/internal/*", "ghcr.io/team/internal/app", True),
        ("ghcr.io/acme/app-*", "ghcr.io/acme/app-web", True),
        ("ghcr.io/acme/app-*", "ghcr.io/acme/web-app", False),
        ("ghcr.io/a.c", "ghcr.io/abc", False),  # dots are literal
        ("**", "registry.example:5000/any/thing", True),
    ],
)
def test_glob_semantics(pattern: str, name: str, matches: bool) -> None:
    policy = Policy(rules((pattern, ["alice"])), ANYONE)
    assert (policy.rule_for(name).pattern == pattern) is matches


def test_first_matching_rule_wins_and_the_default_catches_the_rest() -> None:
    policy = Policy(
        rules(("ghcr.io/acme/public", "anyone"), ("ghcr.io/acme/**", ["group:dev"]), ("ghcr.io/**", "authenticated")),
        [],
    )
    assert policy.allows("ghcr.io/acme/public", None, None)
    assert policy.allows("ghcr.io/acme/app", ALICE, None)
    assert not policy.allows("ghcr.io/acme/app", BOB, None)
    assert policy.allows("ghcr.io/other/app", BOB, None)
    assert not policy.allows("ghcr.io/other/app", None, None)
    assert not policy.allows("docker.io/library/alpine", ALICE, None)  # default: nobody
    assert not policy.open
    assert Policy(rules(("**", "anyone")), ANYONE).open


def test_networks_admit_without_credentials_only_for_their_rule() -> None:
    trusted = config.AccessRule(repository="ghcr.io/acme/**", pull=(), networks=(ipaddress.ip_network("10.0.0.0/8"),))
    policy = Policy([trusted], [])
    inside, outside = ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("192.0.2.1")
    assert policy.allows("ghcr.io/acme/app", None, inside)
    assert not policy.allows("ghcr.io/acme/app", ALICE, outside)
    assert not policy.allows("ghcr.io/other/app", None, inside)


def test_forwarded_for_is_believed_only_as_far_as_trusted_proxies_vouch() -> None:
    proxies = [ipaddress.ip_network("10.9.0.0/16")]

    def seen(peer: str, *forwarded: str) -> str:
        return str(client_address(peer, list(forwarded), proxies))

    assert seen("192.0.2.7", "10.1.1.1") == "192.0.2.7"  # not from a proxy: the header is ignored
    assert seen("10.9.0.1", "10.1.1.1") == "10.1.1.1"
    assert seen("10.9.0.1", "10.1.1.1, 10.9.0.2") == "10.1.1.1"  # through two proxies
    assert seen("10.9.0.1", "10.1.1.1, 192.0.2.66") == "192.0.2.66"  # the client prepended a lie
    assert seen("10.9.0.1", "10.1.1.1", "192.0.2.66") == "192.0.2.66"  # two header lines
    assert seen("10.9.0.1", "garbage") == "10.9.0.1"
    assert seen("::ffff:192.0.2.7") == "192.0.2.7"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pullproxy.toml"
    path.write_text(text)
    return path


def test_a_full_access_configuration_loads(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"carol:{password_hash('pw')}\n")
    (tmp_path / "key").write_text("k" * 40)
    text = f"""
[server]
trusted_proxies = ["10.9.0.0/16"]
[auth]
htpasswd = "{htpasswd}"
token_key_file = "{tmp_path / "key"}"
token_ttl = "10m"
default = "authenticated"
[[auth.user]]
name = "alice"
password_hash = "{password_hash("pw")}"
groups = ["dev"]
[[upstream]]
name = "index.docker.io"
url = "https://registry-1.docker.io"
default = true
[[access]]
repository = "index.docker.io/library/*"
pull = "anyone"
[[access]]
repository = "*/acme/**"
pull = ["group:dev", "carol"]
networks = ["10.0.0.0/8"]
"""
    loaded = config.load(write(tmp_path, text), environ={})
    assert loaded.trusted_proxies == (ipaddress.ip_network("10.9.0.0/16"),)
    assert loaded.auth is not None and loaded.auth.token_key == b"k" * 40 and loaded.auth.token_ttl == 600
    assert loaded.default_pull == "authenticated"
    assert loaded.access[0].repository == "docker.io/library/*"  # Docker Hub under one name
    assert loaded.access[1].pull == ("group:dev", "carol")
    assert config.load(None, environ={}).default_pull == "anyone"  # no [auth]: everything public
    assert config.load(write(tmp_path, "[auth]\n"), environ={}).default_pull == ()  # [auth]: deny


def test_the_readme_access_example_means_what_it_says(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    section = readme[readme.index("## Access control") :]
    text = section[section.index("```toml") + 7 : section.index("```", section.index("```toml") + 7)]
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"carol:{password_hash('pw')}\n")
    text = text.replace("/etc/pullproxy/htpasswd", str(htpasswd)).replace("$2y$05$...", password_hash("pw"))
    loaded = config.load(write(tmp_path, text), environ={"INTERNAL_REGISTRY_PASSWORD": "x"})
    policy = Policy(loaded.access, loaded.default_pull)
    alice, carol = User("alice", frozenset({"dev"})), User("carol")
    ci, elsewhere = ipaddress.ip_address("10.20.30.40"), ipaddress.ip_address("192.0.2.1")
    assert policy.allows("docker.io/library/alpine", None, elsewhere)
    assert policy.allows("registry.example:5000/team/app", alice, elsewhere)
    assert not policy.allows("registry.example:5000/team/app", carol, elsewhere)
    assert policy.allows("registry.example:5000/team/app", None, ci)
    assert policy.allows("docker.io/bitnami/redis", carol, elsewhere)
    assert policy.allows("docker.io/bitnami/redis", None, ci)
    assert not policy.allows("docker.io/bitnami/redis", None, elsewhere)


def test_trusted_proxies_from_the_environment(tmp_path: Path) -> None:
    loaded = config.load(None, environ={"PULLPROXY_SERVER_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2/31"})
    assert [str(n) for n in loaded.trusted_proxies] == ["10.0.0.1/32", "10.0.0.2/31"]


GOOD_HASH = password_hash("pw")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[auth]\nhtpasswd = '/nonexistent/htpasswd'\n", "auth.htpasswd: cannot read"),
        ("[auth]\nusers = []\n", "auth.users: unknown key"),
        ("[[auth.user]]\nname = 'a'\npassword_hash = 'plain'\n", "auth.user[0].password_hash: not a bcrypt hash"),
        ("[[auth.user]]\npassword_hash = 'x'\n", "auth.user[0].name: missing"),
        (f"[[auth.user]]\nname = 'a:b'\npassword_hash = '{GOOD_HASH}'\n", "must not contain ':'"),
        (
            f"[[auth.user]]\nname = 'a'\npassword_hash = '{GOOD_HASH}'\n"
            f"[[auth.user]]\nname = 'a'\npassword_hash = '{GOOD_HASH}'\n",
            "'a' is configured twice",
        ),
        ("[auth]\ntoken_key_env = 'PULLPROXY_TEST_UNSET'\n", "auth.token_key_env: environment variable"),
        ("[auth]\ntoken_key_env = 'SHORT_KEY'\n", "auth.token_key_env: the key must be at least 32 bytes"),
        ("[auth]\ntoken_key_env = 'SHORT_KEY'\ntoken_key_file = 'x'\n", "exclude each other"),
        ("[auth]\ntoken_ttl = '10s'\n", "auth.token_ttl"),
        ("[auth]\ndefault = 'everyone'\n", "auth.default"),
        ("[[access]]\nrepository = 'docker.io/*'\npull = 'authenticated'\n", "needs an [auth] section"),
        ("[[access]]\nrepository = 'docker.io/*'\npull = ['alice']\n", "needs an [auth] section"),
        ("[auth]\n[[access]]\nrepository = 'docker.io/*'\npull = ['group:ops']\n", "no [[auth.user]] is in group"),
        ("[[access]]\nrepository = 'docker.io/*'\n", "access[0].pull: missing"),
        ("[[access]]\nrepository = 'Docker.io/*'\npull = 'anyone'\n", "access[0].repository"),
        ("[[access]]\nrepository = 'docker.io/a**'\npull = 'anyone'\n", "access[0].repository"),
        ("[[access]]\nrepository = 'docker.io//a'\npull = 'anyone'\n", "access[0].repository"),
        ("[[access]]\nrepository = 'ghrc.io/acme/**'\npull = 'anyone'\n", "'ghrc.io' is not a configured upstream"),
        ("[[access]]\nrepository = '**'\npull = 'anyone'\nnetworks = ['10.0.0.0/88']\n", "access[0].networks"),
        ("[[access]]\nrepository = '**'\npull = 'anyone'\nnetworks = '10.0.0.0/8'\n", "access[0].networks"),
        ("[server]\ntrusted_proxies = ['proxy.example']\n", "server.trusted_proxies"),
    ],
)
def test_bad_access_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(config.ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        config.load(write(tmp_path, text), environ={"SHORT_KEY": "too short"})


def test_htpasswd_mistakes_name_the_line(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{GOOD_HASH}\nbob:{{SHA}}fEqNCco3Yq9h5ZUglD3CZJT4lBs=\n")
    with pytest.raises(config.ConfigError, match=r"auth.htpasswd: line 2: 'bob' has no bcrypt hash"):
        config.load(write(tmp_path, f"[auth]\nhtpasswd = '{htpasswd}'\n"), environ={})
