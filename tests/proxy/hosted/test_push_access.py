"""Who may push and delete hosted repositories: rules' `push` and `delete`, tokens' actions, challenges."""

from __future__ import annotations

import base64
import tempfile
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


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[httpx.Client, MemoryRegistry]]:
    """alice may pull the hosted acme/secret and the mirrored team/private; bob may push acme/** but not."""
    auth = AuthConfig(
        user=(
            UserConfig(name="alice", password_hash=password_hash("a")),
            UserConfig(name="bob", password_hash=password_hash("b")),
        )
    )
    access = (
        AccessRule(repository="acme/secret", pull=("alice",), push=("alice",)),
        AccessRule(repository="registry.test/team/private", pull=("alice",)),
        AccessRule(repository="acme/**", pull="anyone", push=("alice", "bob")),
    )
    upstream = MemoryRegistry()
    with tempfile.TemporaryDirectory() as directory:
        hosted = Hosted(repositories=("acme/**",))
        with mirror_client(Path(directory), upstream, auth=auth, access=access, hosted=hosted) as client:
            yield client, upstream


def _private_blob(client: httpx.Client, upstream: MemoryRegistry, source: str) -> str:
    """A blob alice put in `source`: pushed to the hosted one, pulled (so cached) from the mirrored one."""
    data = f"only for alice, in {source}".encode() * 100
    if source.startswith("acme/"):
        pushed = client.post(
            f"/v2/{source}/blobs/uploads/", params={"digest": sha(data)}, content=data, headers=basic("alice", "a")
        )
        assert pushed.status_code == 201
    else:
        upstream.add_blob(source, data)
        assert client.get(f"/v2/{source}/blobs/{sha(data)}", headers=basic("alice", "a")).content == data
    assert client.get(f"/v2/{source}/blobs/{sha(data)}", headers=basic("bob", "b")).status_code == 403
    return sha(data)


@pytest.mark.parametrize("source", ["acme/secret", "team/private"])
def test_a_mount_from_a_private_repository_the_caller_may_not_pull_starts_a_normal_upload(
    private: tuple[httpx.Client, MemoryRegistry], source: str
) -> None:
    client, upstream = private
    digest = _private_blob(client, upstream, source)
    asked = len(upstream.requests)
    url = "/v2/acme/bob/blobs/uploads/"
    mounted = client.post(url, params={"mount": digest, "from": source}, headers=basic("bob", "b"))
    nowhere = client.post(url, params={"mount": sha(b"nowhere"), "from": source}, headers=basic("bob", "b"))
    for answer in (mounted, nowhere):
        assert answer.status_code == 202, answer.text
        assert answer.headers["Location"].startswith("/v2/acme/bob/blobs/uploads/")
        assert answer.headers["Range"] == "0-0" and answer.content == b""
    assert mounted.headers.keys() == nowhere.headers.keys()  # nothing tells a held blob from a missing one
    assert client.get(f"/v2/acme/bob/blobs/{digest}", headers=basic("bob", "b")).status_code == 404
    assert client.head(f"/v2/acme/bob/blobs/{digest}", headers=basic("bob", "b")).status_code == 404
    assert len(upstream.requests) == asked  # and no upstream was asked on bob's behalf


@pytest.mark.parametrize("source", ["acme/secret", "team/private"])
def test_a_mount_from_a_private_repository_the_caller_may_pull_mounts(
    private: tuple[httpx.Client, MemoryRegistry], source: str
) -> None:
    client, upstream = private
    digest = _private_blob(client, upstream, source)
    url = "/v2/acme/alice/blobs/uploads/"
    mounted = client.post(url, params={"mount": digest, "from": source}, headers=basic("alice", "a"))
    assert mounted.status_code == 201, mounted.text
    assert mounted.headers["Location"] == f"/v2/acme/alice/blobs/{digest}"
    assert mounted.headers["Docker-Content-Digest"] == digest
    assert client.get(f"/v2/acme/alice/blobs/{digest}").content == f"only for alice, in {source}".encode() * 100
