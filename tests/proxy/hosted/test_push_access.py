"""Who may push and delete hosted repositories: rules' `push` and `delete`, tokens' actions, challenges."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.config import AccessRule, AuthConfig, Hosted, UserConfig
from tests.proxy.hosted.test_push_api import push_blob, sha
from tests.support.auth import bearer, challenge, claims, password_hash
from tests.support.inprocess import MemoryRegistry, mirror_client


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    auth = AuthConfig(
        user=(
            UserConfig(name="alice", password_hash=password_hash("a")),
            UserConfig(name="bob", password_hash=password_hash("b")),
        )
    )
    access = (AccessRule(repository="acme/**", pull="anyone", push=("alice",), delete=("alice",)),)
    hosted = Hosted(repositories=("acme/**",))
    directory = tmp_path_factory.mktemp("hosted")
    with mirror_client(directory, MemoryRegistry(), auth=auth, access=access, hosted=hosted) as client:
        yield client


def test_anonymous_push_gets_a_push_challenge(client: httpx.Client) -> None:
    refused = push_blob(client, "acme/app", b"x")
    assert refused.status_code == 401
    assert challenge(refused)["scope"] == "repository:acme/app:pull,push"


def test_push_without_the_right_is_denied(client: httpx.Client) -> None:
    refused = client.post("/v2/acme/app/blobs/uploads/", headers=basic("bob", "b"))
    assert refused.status_code == 403
    assert refused.json()["errors"][0]["code"] == "DENIED"


def test_push_with_the_right_is_allowed_and_pull_stays_public(client: httpx.Client) -> None:
    pushed = client.post(
        "/v2/acme/app/blobs/uploads/", params={"digest": sha(b"y")}, content=b"y", headers=basic("alice", "a")
    )
    assert pushed.status_code == 201
    assert client.get(f"/v2/acme/app/blobs/{sha(b'y')}").content == b"y"
    assert client.delete(f"/v2/acme/app/blobs/{sha(b'y')}").status_code == 401
    assert client.delete(f"/v2/acme/app/blobs/{sha(b'y')}", headers=basic("bob", "b")).status_code == 403
    assert client.delete(f"/v2/acme/app/blobs/{sha(b'y')}", headers=basic("alice", "a")).status_code == 202


def test_token_grants_push_only_as_far_as_the_rules_allow(client: httpx.Client) -> None:
    scope = {"service": "pullproxy", "scope": "repository:acme/app:pull,push"}
    alice = client.get("/token", params=scope, headers=basic("alice", "a")).json()["token"]
    bob = client.get("/token", params=scope, headers=basic("bob", "b")).json()["token"]
    assert claims(alice)["access"] == [{"type": "repository", "name": "acme/app", "actions": ["pull", "push"]}]
    assert claims(bob)["access"] == [{"type": "repository", "name": "acme/app", "actions": ["pull"]}]
    data = b"token-pushed"
    url = "/v2/acme/app/blobs/uploads/"
    assert client.post(url, params={"digest": sha(data)}, content=data, headers=bearer(alice)).status_code == 201
    refused = client.post(url, params={"digest": sha(data)}, content=data, headers=bearer(bob))
    assert refused.status_code == 403  # bob may never push: more scope would not help


def test_a_pull_token_of_a_pusher_is_asked_to_get_push_scope(client: httpx.Client) -> None:
    pull_only = {"service": "pullproxy", "scope": "repository:acme/app:pull"}
    token = client.get("/token", params=pull_only, headers=basic("alice", "a")).json()["token"]
    refused = client.post("/v2/acme/app/blobs/uploads/", headers=bearer(token))
    assert refused.status_code == 401
    assert challenge(refused)["error"] == "insufficient_scope"
    assert challenge(refused)["scope"] == "repository:acme/app:pull,push"


def test_without_auth_anyone_may_push_and_delete(tmp_path: Path) -> None:
    with mirror_client(tmp_path, MemoryRegistry(), hosted=Hosted(repositories=("acme/**",))) as client:
        assert push_blob(client, "acme/app", b"z").status_code == 201
        assert client.delete(f"/v2/acme/app/blobs/{sha(b'z')}").status_code == 202
