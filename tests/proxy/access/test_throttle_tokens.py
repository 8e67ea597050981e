"""proxy.access.throttle and proxy.access.tokens, in-process."""

from __future__ import annotations

import time

import jwt
import pytest

from proxy.access.throttle import LoginThrottle
from proxy.access.tokens import SERVICE, InvalidToken, Tokens, load_or_create_key

KEY = b"k" * 32


def test_failures_past_the_free_ones_wait_doubling_up_to_the_cap() -> None:
    throttle = LoginThrottle(free=2, first_delay=0.5, max_delay=3.0)
    delays = []
    for _ in range(6):
        delays.append(throttle.delay("10.0.0.1"))
        throttle.failed("10.0.0.1")
    assert delays == [0.0, 0.0, 0.5, 1.0, 2.0, 3.0]
    assert throttle.delay("10.0.0.2") == 0.0  # per address
    assert throttle.total_failures == 6


def test_failure_counts_are_bounded_in_memory() -> None:
    throttle = LoginThrottle()
    for i in range(20_000):
        throttle.failed(f"addr-{i}")
    assert len(throttle._failures) <= 10_000


def test_a_token_grants_exactly_the_repositories_it_was_issued_for() -> None:
    tokens = Tokens(KEY, ttl=60)
    answer = tokens.issue("alice", {"docker.io/library/alpine", "ghcr.io/acme/app"})
    assert answer["token"] == answer["access_token"] and answer["expires_in"] == 60
    grant = tokens.verify(str(answer["token"]))
    assert grant.subject == "alice"
    assert grant.repositories == frozenset({"docker.io/library/alpine", "ghcr.io/acme/app"})
    assert tokens.verify(str(tokens.issue(None, [])["token"])).subject is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda claims: {**claims, "exp": int(time.time()) - 1},
        lambda claims: {**claims, "aud": "other"},
        lambda claims: {**claims, "iss": "other"},
        lambda claims: {k: v for k, v in claims.items() if k != "sub"},
    ],
)
def test_expired_foreign_or_incomplete_tokens_are_refused(edit) -> None:  # type: ignore[no-untyped-def]
    now = int(time.time())
    claims = {"iss": SERVICE, "aud": SERVICE, "sub": "alice", "iat": now, "exp": now + 60, "access": []}
    with pytest.raises(InvalidToken):
        Tokens(KEY, 60).verify(jwt.encode(edit(claims), KEY, algorithm="HS256"))


def test_a_token_signed_with_another_key_or_edited_is_refused() -> None:
    token = str(Tokens(b"x" * 32, 60).issue("alice", ["docker.io/library/alpine"])["token"])
    with pytest.raises(InvalidToken):
        Tokens(KEY, 60).verify(token)
    good = str(Tokens(KEY, 60).issue("alice", [])["token"])
    head, payload, signature = good.split(".")
    with pytest.raises(InvalidToken):
        Tokens(KEY, 60).verify(f"{head}.{payload}x.{signature}")


def test_every_worker_gets_the_same_generated_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = load_or_create_key(tmp_path)
    assert len(first) == 64 and load_or_create_key(tmp_path) == first
    assert (tmp_path / "token.key").stat().st_mode & 0o777 == 0o600
