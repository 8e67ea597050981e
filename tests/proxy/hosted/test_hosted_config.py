"""`[hosted]` in the configuration file: defaults, bad values named by key, rules on hosted names."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, load


def test_hosted_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[hosted]\nrepositories = ["acme/**"]\n')
    assert config.hosted is not None
    assert config.hosted.repositories == ("acme/**",)
    assert (config.hosted.max_repositories, config.hosted.max_size) == (500, 500 << 30)
    assert (config.hosted.max_manifests_per_repository, config.hosted.upload_ttl) == (100000, 3600.0)
    assert load_text(tmp_path, "").hosted is None


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "pullproxy.toml"
    path.write_text(text)
    return load(path, environ={})


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[hosted]\nrepositories = ["Acme/**"]\n', "hosted.repositories"),
        ('[hosted]\nmax_size = "lots"\n', "hosted.max_size"),
        ("[hosted]\nmax_repositories = 0\n", "hosted.max_repositories"),
        ('[hosted]\nupload_ttl = "soon"\n', "hosted.upload_ttl"),
        ("[hosted]\nquota = 1\n", "hosted.quota"),
    ],
)
def test_bad_hosted_values_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_text(tmp_path, text)


def test_access_rules_may_name_hosted_repositories_with_push_and_delete(tmp_path: Path) -> None:
    text = (
        '[hosted]\nrepositories = ["acme/**"]\n'
        '[[auth.user]]\nname = "alice"\npassword_hash = "$2y$04$' + "a" * 53 + '"\n'
        '[[access]]\nrepository = "acme/**"\npull = "anyone"\npush = ["alice"]\ndelete = []\n'
    )
    config = load_text(tmp_path, text)
    assert config.access[0].push == ("alice",)
    assert config.access[0].delete == ()


def test_a_rule_on_an_unknown_name_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a configured upstream"):
        load_text(
            tmp_path, '[hosted]\nrepositories = ["acme/**"]\n[[access]]\nrepository = "other/**"\npull = "anyone"\n'
        )


def test_push_naming_users_needs_auth(tmp_path: Path) -> None:
    text = (
        '[hosted]\nrepositories = ["acme/**"]\n[[access]]\nrepository = "acme/**"\npull = "anyone"\npush = ["alice"]\n'
    )
    with pytest.raises(ConfigError, match="push"):
        load_text(tmp_path, text)
