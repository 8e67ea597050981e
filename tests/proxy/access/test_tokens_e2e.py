"""`/token` and Bearer tokens: what is granted, and every way a token must be refused."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.support.auth import bearer, challenge, claims, error_code, user_entry
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

KEY = "k" * 64
ALICE = ("alice", "alice-pw")  # group dev
BOB = ("bob", "bob-pw")
APP = "/v2/ghcr.io/acme/app/manifests/1"


@pytest.fixture(scope="module")
def hub() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        registry.add_image("library/alpine", "1")
        registry.add_image("bob/own", "1")
        yield registry


@pytest.fixture(scope="module")
def ghcr() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        registry.add_image("acme/app", "1")
        registry.add_image("acme/other", "1")
        yield registry


def access_config(hub: FaultyRegistry, ghcr: FaultyRegistry, auth: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "upstream": [{"name": "docker.io", "url": hub.url, "default": True}, {"name": "ghcr.io", "url": ghcr.url}],
        "auth": {
            "user": [user_entry(ALICE, "dev"), user_entry(BOB)],
            **(auth or {}),
        },
        "access": [
            {"repository": "docker.io/library/*", "pull": "anyone"},
            {"repository": "ghcr.io/acme/**", "pull": ["group:dev"]},
            {"repository": "docker.io/bob/*", "pull": ["bob"]},
        ],
    }


@pytest.fixture(scope="module")
def proxy(hub: FaultyRegistry, ghcr: FaultyRegistry) -> Iterator[Proxy]:
    config = access_config(hub, ghcr, {"token_key_env": "TOKEN_KEY", "token_ttl": "2m"})
    with Proxy(config, env={"TOKEN_KEY": KEY}) as running:
        yield running


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        yield c


def granted(token: str) -> set[str]:
    return {entry["name"] for entry in claims(token)["access"] if entry["actions"] == ["pull"]}


def forge(**changes: Any) -> str:
    """A token as the mirror would sign it for alice, with `changes` to the claims."""
    now = int(time.time())
    payload = {"iss": "pullproxy", "aud": "pullproxy", "sub": "alice", "iat": now, "exp": now + 60,
               "access": [{"type": "repository", "name": "ghcr.io/acme/app", "actions": ["pull"]}]}  # fmt: skip
    payload.update(changes)
    return jwt.encode(payload, KEY, algorithm="HS256")


def test_token_grants_exactly_the_scopes_the_rules_allow(client: httpx.Client) -> None:
    scopes = {
        "service": "pullproxy",
        "scope": ["repository:ghcr.io/acme/app:pull repository:bob/own:pull", "repository:alpine:pull,push"],
    }
    answer = client.get("/token", params=scopes, auth=ALICE)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 120
    assert abs(datetime.fromisoformat(body["issued_at"].replace("Z", "+00:00")).timestamp() - time.time()) < 60
    assert granted(body["token"]) == {"ghcr.io/acme/app", "docker.io/library/alpine"}
    assert claims(body["token"])["sub"] == "alice"
    assert granted(client.get("/token", params=scopes, auth=BOB).json()["token"]) == {
        "docker.io/bob/own",
        "docker.io/library/alpine",
    }
    anonymous = client.get("/token", params=scopes).json()["token"]
    assert granted(anonymous) == {"docker.io/library/alpine"}
    assert claims(anonymous)["sub"] == ""
    odd = {"scope": "repository:Not/Valid:pull registry:catalog:* repository:quay.io/x/y:pull repository:alpine:push"}
    assert granted(client.get("/token", params=odd, auth=ALICE).json()["token"]) == set()


def test_token_endpoint_refusals(client: httpx.Client) -> None:
    wrong = client.get("/token", params={"scope": "repository:ghcr.io/acme/app:pull"}, auth=(ALICE[0], "nope"))
    unknown = client.get("/token", params={"scope": "repository:ghcr.io/acme/app:pull"}, auth=("mallory", "nope"))
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert error_code(response) == "UNAUTHORIZED"
        assert response.headers["WWW-Authenticate"] == 'Basic realm="pullproxy"'
    assert wrong.content == unknown.content
    assert client.get("/token", params={"service": "registry.docker.io"}, auth=ALICE).status_code == 400
    assert client.get("/token", params={"account": "bob"}, auth=ALICE).status_code == 401
    assert client.get("/token", params={"account": "alice"}, auth=ALICE).status_code == 200
    assert client.get("/token", headers=bearer(forge())).status_code == 401  # tokens do not buy tokens


def test_the_docker_token_flow_end_to_end(client: httpx.Client) -> None:
    for path in (APP, "/v2/acme/app/manifests/1?ns=ghcr.io"):
        refused = client.get(path)
        assert refused.status_code == 401
        asked = challenge(refused)
        # As Go clients do: the realm's own query (?ns=) is kept, service and scope added.
        realm = httpx.URL(asked["realm"]).copy_merge_params({"service": asked["service"], "scope": asked["scope"]})
        answer = client.get(realm, auth=ALICE)
        assert granted(answer.json()["token"]) == {"ghcr.io/acme/app"}  # the realm carries ?ns=
        assert client.get(path, headers=bearer(answer.json()["token"])).status_code == 200


def test_a_token_for_one_repository_does_not_open_another(client: httpx.Client) -> None:
    token = client.get("/token", params={"scope": "repository:ghcr.io/acme/app:pull"}, auth=ALICE).json()["token"]
    assert client.get(APP, headers=bearer(token)).status_code == 200
    other = client.get("/v2/ghcr.io/acme/other/manifests/1", headers=bearer(token))
    assert other.status_code == 401  # alice may pull it: she is sent for a token that says so
    assert challenge(other)["error"] == "insufficient_scope"
    assert challenge(other)["scope"] == "repository:ghcr.io/acme/other:pull"
    not_hers = client.get("/v2/bob/own/manifests/1", headers=bearer(token))
    assert not_hers.status_code == 403
    assert error_code(not_hers) == "DENIED"
    anonymous = client.get("/token", params={"scope": "repository:ghcr.io/acme/app:pull"}).json()["token"]
    assert client.get(APP, headers=bearer(anonymous)).status_code == 401


def test_edited_expired_and_foreign_tokens_are_refused(client: httpx.Client) -> None:
    token = client.get("/token", params={"scope": "repository:ghcr.io/acme/app:pull"}, auth=ALICE).json()["token"]
    header, payload, signature = token.split(".")
    edited = claims(token)
    edited["access"][0]["name"] = "docker.io/bob/own"
    tampered = base64.urlsafe_b64encode(json.dumps(edited).encode()).decode().rstrip("=")
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")
    refused = {
        "edited claims": f"{header}.{tampered}.{signature}",
        "no signature": f"{unsigned}.{payload}.",
        "another key": jwt.encode(claims(token), "x" * 64, algorithm="HS256"),
        "expired": forge(iat=int(time.time()) - 600, exp=int(time.time()) - 300),
        "another service": forge(aud="registry.docker.io"),
        "another issuer": forge(iss="auth.docker.io"),
        "no expiry": forge(exp=None),
        "garbage": "not.a.token",
    }
    assert client.get(APP, headers=bearer(forge())).status_code == 200  # the forgery itself is sound
    for what, bad in refused.items():
        response = client.get(APP, headers=bearer(bad))
        assert response.status_code == 401, what
        assert challenge(response)["error"] == "invalid_token", what
    assert client.get("/v2/bob/own/manifests/1", headers=bearer(refused["edited claims"])).status_code == 401


def test_generated_key_is_kept_in_the_cache_dir_and_survives_a_restart(
    hub: FaultyRegistry, ghcr: FaultyRegistry
) -> None:
    with Proxy(access_config(hub, ghcr)) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        key_file: Path = proxy.cache_dir / "token.key"
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert len(key_file.read_text().strip()) >= 32
        token = client.get("/token", params={"scope": "repository:ghcr.io/acme/app:pull"}, auth=ALICE).json()["token"]
        proxy.stop()
        proxy.start()
        assert client.get(APP, headers=bearer(token)).status_code == 200
        assert client.get(APP, headers=bearer(forge())).status_code == 401  # not the key the test knows
