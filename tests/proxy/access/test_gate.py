"""Access rules over HTTP: challenges, refusals, Basic credentials, trusted networks and
proxies, and what `_catalog`, `tags/list` and referrers show. Every refusal is checked
to cost no upstream request."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.auth import challenge, client_from, error_code, password_hash, user_entry
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

ALICE = ("alice", "alice-pw")  # group dev
BOB = ("bob", "bob-pw")  # no group
CAROL = ("carol", "carol-pw")  # from the htpasswd file
TRUSTED_CLIENT = "127.0.0.2"
TRUSTED_PROXY = "127.0.0.4"


@pytest.fixture(scope="module")
def hub() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        registry.add_image("library/alpine", "1")
        registry.add_image("team/tool", "1")
        registry.add_image("carol/box", "1")
        yield registry


@pytest.fixture(scope="module")
def ghcr() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        registry.add_image("acme/app", "1")
        registry.add_image("acme/app", "2")
        yield registry


@pytest.fixture(scope="module")
def proxy(hub: FaultyRegistry, ghcr: FaultyRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    htpasswd = tmp_path_factory.mktemp("auth") / "htpasswd"
    htpasswd.write_text(f"carol:{password_hash(CAROL[1])}\n")
    config = {
        "server": {"trusted_proxies": [f"{TRUSTED_PROXY}/32"]},
        "upstream": [{"name": "docker.io", "url": hub.url, "default": True}, {"name": "ghcr.io", "url": ghcr.url}],
        "auth": {
            "htpasswd": str(htpasswd),
            "user": [user_entry(ALICE, "dev"), user_entry(BOB)],
        },
        "access": [
            {"repository": "docker.io/library/*", "pull": "anyone"},
            {"repository": "ghcr.io/acme/**", "pull": ["group:dev"], "networks": [f"{TRUSTED_CLIENT}/32"]},
            {"repository": "docker.io/team/*", "pull": "authenticated"},
            {"repository": "docker.io/carol/*", "pull": ["carol"]},
        ],
    }
    with Proxy(config) as running:
        yield running


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        yield c


PRIVATE = "/v2/ghcr.io/acme/app/manifests/1"


def upstream_requests(*registries: FaultyRegistry) -> int:
    return sum(len(r.requests()) + len(r.requests("token")) for r in registries)


def test_public_repository_needs_no_credentials_and_looks_at_none(client: httpx.Client) -> None:
    assert client.get("/v2/library/alpine/manifests/1").status_code == 200
    assert client.get("/v2/alpine/manifests/1", headers={"Authorization": "Bearer not-a-token"}).status_code == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    ("path", "scope", "realm_query"),
    [
        (PRIVATE, "repository:ghcr.io/acme/app:pull", ""),
        ("/v2/acme/app/manifests/1?ns=ghcr.io", "repository:acme/app:pull", "?ns=ghcr.io"),
        ("/v2/ghcr.io/acme/app/blobs/sha256:" + "0" * 64, "repository:ghcr.io/acme/app:pull", ""),
        ("/v2/ghcr.io/acme/app/tags/list", "repository:ghcr.io/acme/app:pull", ""),
        ("/v2/ghcr.io/acme/app/referrers/sha256:" + "0" * 64, "repository:ghcr.io/acme/app:pull", ""),
        ("/v2/team/tool/manifests/1", "repository:team/tool:pull", ""),
    ],
)
def test_no_credentials_on_a_private_repository_gets_the_bearer_challenge(
    client: httpx.Client, proxy: Proxy, hub: FaultyRegistry, ghcr: FaultyRegistry,
    method: str, path: str, scope: str, realm_query: str,
) -> None:  # fmt: skip
    before = upstream_requests(hub, ghcr)
    response = client.request(method, path)
    assert response.status_code == 401
    assert challenge(response) == {"realm": f"{proxy.url}/token{realm_query}", "service": "pullproxy", "scope": scope}
    if method == "GET":
        assert error_code(response) == "UNAUTHORIZED"
    assert upstream_requests(hub, ghcr) == before


def test_the_realm_follows_the_host_the_client_used(proxy: Proxy) -> None:
    response = httpx.get(proxy.url + PRIVATE, headers={"Host": f"mirror.internal:{proxy.port}"})
    assert challenge(response)["realm"] == f"http://mirror.internal:{proxy.port}/token"
    forged = httpx.get(proxy.url + PRIVATE, headers={"Host": 'evil",realm="http://x'})
    assert challenge(forged)["realm"] == f"{proxy.url}/token"


def test_basic_credentials_open_what_the_rules_allow_and_nothing_else(
    client: httpx.Client, hub: FaultyRegistry, ghcr: FaultyRegistry
) -> None:
    assert client.get(PRIVATE, auth=ALICE).status_code == 200
    assert client.get("/v2/team/tool/manifests/1", auth=BOB).status_code == 200  # "authenticated"
    assert client.get("/v2/carol/box/manifests/1", auth=CAROL).status_code == 200  # from htpasswd
    before = upstream_requests(hub, ghcr)
    for path, who in [(PRIVATE, BOB), (PRIVATE, CAROL), ("/v2/carol/box/manifests/1", ALICE)]:
        response = client.get(path, auth=who)
        assert response.status_code == 403, (path, who)
        assert error_code(response) == "DENIED"
    assert client.get("/v2/unlisted/repo/manifests/1", auth=ALICE).status_code == 403  # default: nobody
    assert upstream_requests(hub, ghcr) == before


def test_wrong_password_is_refused_like_an_unknown_user(client: httpx.Client) -> None:
    wrong = client.get(PRIVATE, auth=(ALICE[0], "nope"))
    unknown = client.get(PRIVATE, auth=("mallory", "nope"))
    garbled = client.get(PRIVATE, headers={"Authorization": "Basic %%%"})
    for response in (wrong, unknown, garbled):
        assert response.status_code == 401
        assert error_code(response) == "UNAUTHORIZED"
        assert challenge(response)["scope"] == "repository:ghcr.io/acme/app:pull"
    assert wrong.content == unknown.content == garbled.content
    assert wrong.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]
    public = client.get("/v2/library/alpine/manifests/1", auth=(ALICE[0], "nope"))
    assert public.status_code == 200  # a public repository does not look at credentials


def test_v2_base_challenges_a_caller_without_credentials(client: httpx.Client, proxy: Proxy) -> None:
    anonymous = client.get("/v2/")
    assert anonymous.status_code == 401
    assert challenge(anonymous) == {"realm": f"{proxy.url}/token", "service": "pullproxy"}
    assert client.get("/v2/", auth=ALICE).status_code == 200
    assert client.get("/v2/", auth=(ALICE[0], "nope")).status_code == 401
    token = client.get("/token", params={"service": "pullproxy"}).json()["token"]  # what docker does next
    assert client.get("/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_open_mirror_v2_base_needs_nothing(hub: FaultyRegistry) -> None:
    with Proxy(upstream_url=hub.url) as open_proxy:
        assert httpx.get(f"{open_proxy.url}/v2/", timeout=10).status_code == 200


def test_trusted_network_pulls_without_credentials(proxy: Proxy) -> None:
    with client_from(proxy.url, TRUSTED_CLIENT) as inside, client_from(proxy.url, "127.0.0.3") as outside:
        assert inside.get(PRIVATE).status_code == 200
        assert inside.get("/v2/ghcr.io/acme/app/tags/list").json()["tags"] == ["1", "2"]
        assert outside.get(PRIVATE).status_code == 401
        assert inside.get("/v2/team/tool/manifests/1").status_code == 401  # only that rule's repositories


def test_forwarded_for_counts_only_from_a_trusted_proxy(proxy: Proxy) -> None:
    claims_inside = {"X-Forwarded-For": TRUSTED_CLIENT}
    with client_from(proxy.url, TRUSTED_PROXY) as via_proxy, client_from(proxy.url, "127.0.0.5") as direct:
        assert via_proxy.get(PRIVATE, headers=claims_inside).status_code == 200
        assert direct.get(PRIVATE, headers=claims_inside).status_code == 401
        # A client that sends its own header behind the proxy: the proxy appends the real address.
        spoofed = {"X-Forwarded-For": f"{TRUSTED_CLIENT}, 127.0.0.9"}
        assert via_proxy.get(PRIVATE, headers=spoofed).status_code == 401
        assert via_proxy.get(PRIVATE).status_code == 401  # the proxy itself is not trusted for pulls


def test_tags_list_and_referrers_are_gated_like_manifests(client: httpx.Client, ghcr: FaultyRegistry) -> None:
    subject, _ = ghcr.add_image("acme/signed", "1")
    for path in ("/v2/ghcr.io/acme/app/tags/list", f"/v2/ghcr.io/acme/signed/referrers/{subject}"):
        assert client.get(path).status_code == 401
        assert client.get(path, auth=BOB).status_code == 403
        assert client.get(path, auth=ALICE).status_code == 200
    assert client.get("/v2/ghcr.io/acme/app/tags/list", auth=ALICE).json()["tags"] == ["1", "2"]


def test_catalog_lists_only_what_the_caller_may_pull(client: httpx.Client, proxy: Proxy) -> None:
    for path, who in [
        ("/v2/library/alpine/manifests/1", None),
        (PRIVATE, ALICE),
        ("/v2/team/tool/manifests/1", BOB),
        ("/v2/carol/box/manifests/1", CAROL),
    ]:
        client.get(path, auth=who).raise_for_status()

    def catalog(who: tuple[str, str] | None = None, http: httpx.Client = client) -> set[str]:
        response = http.get("/v2/_catalog", auth=who)
        assert response.status_code == 200
        return set(response.json()["repositories"])

    assert catalog() == {"library/alpine"}
    assert catalog(ALICE) == {"library/alpine", "ghcr.io/acme/app", "team/tool"}
    assert catalog(BOB) == {"library/alpine", "team/tool"}
    assert catalog(CAROL) == {"library/alpine", "team/tool", "carol/box"}
    with client_from(proxy.url, TRUSTED_CLIENT) as inside:
        assert catalog(http=inside) == {"library/alpine", "ghcr.io/acme/app"}
    assert client.get("/v2/_catalog", auth=(ALICE[0], "nope")).status_code == 401


def test_status_page_shows_only_images_the_caller_may_pull(client: httpx.Client, ghcr: FaultyRegistry) -> None:
    client.get("/v2/library/alpine/manifests/1").raise_for_status()
    client.get(PRIVATE, auth=ALICE).raise_for_status()
    ghcr.fail(503, path="acme/broken", times=1)
    assert client.get("/v2/ghcr.io/acme/broken/manifests/1", auth=ALICE).status_code == 503
    client.get("/v2/carol/box/manifests/1", auth=CAROL).raise_for_status()
    anonymous = client.get("/").text
    assert "library/alpine:1" in anonymous
    for private in ("acme/app", "acme/broken", "carol/box"):
        assert private not in anonymous
    alice = client.get("/", auth=ALICE).text
    assert "ghcr.io/acme/app:1" in alice and "acme/broken" in alice and "carol/box" not in alice


def test_the_access_log_names_the_user(client: httpx.Client, proxy: Proxy) -> None:
    client.get("/v2/ghcr.io/acme/app/manifests/2", auth=ALICE).raise_for_status()
    deadline = time.monotonic() + 5
    while not (lines := [line for line in proxy.log_text().splitlines() if "/acme/app/manifests/2" in line]):
        assert time.monotonic() < deadline, "no access log line"  # written once the response is out
        time.sleep(0.05)
    assert json.loads(lines[0])["user"] == "alice"


def test_upstream_credentials_never_reach_a_client_or_the_log(tmp_path: Path) -> None:
    secrets = {"basic": ("robot", "upstream-basic-secret"), "bearer": ("robot2", "upstream-token-secret")}
    with (
        FaultyRegistry(auth="basic", credentials=secrets["basic"]) as basic,
        FaultyRegistry(auth="bearer", token_credentials=secrets["bearer"]) as bearer,
    ):
        digest, _ = basic.add_image("team/app", "1")
        bearer.add_image("team/app", "1")
        config = {
            "upstream": [
                {"name": "docker.io", "url": basic.url, "default": True, "username": "robot",
                 "password_env": "BASIC_PW"},
                {"name": "ghcr.io", "url": bearer.url, "username": "robot2", "password": secrets["bearer"][1]},
            ],
            "auth": {"user": [user_entry(ALICE)]},
            "access": [{"repository": "docker.io/team/*", "pull": "anyone"}, {"repository": "**", "pull": ["alice"]}],
        }  # fmt: skip
        with Proxy(config, env={"BASIC_PW": secrets["basic"][1]}) as proxy, httpx.Client(base_url=proxy.url) as c:
            responses = [
                c.get("/v2/team/app/manifests/1"),
                c.get(f"/v2/team/app/manifests/{digest}"),
                c.get("/v2/team/app/manifests/missing"),
                c.get("/v2/ghcr.io/team/app/manifests/1", auth=ALICE),
                c.get("/v2/ghcr.io/team/app/manifests/1"),
                c.get("/v2/ghcr.io/team/app/manifests/1", auth=("robot2", secrets["bearer"][1])),
                c.get("/token", params={"scope": "repository:ghcr.io/team/app:pull"}),
            ]
            bearer.invalidate_tokens()
            basic.fail(status=500, path="/manifests/")
            bearer.token_credentials = ("robot2", "rotated")  # our credentials are now refused upstream
            responses += [c.get("/v2/team/app/manifests/2"), c.get("/v2/ghcr.io/team/app/manifests/2", auth=ALICE)]
            assert [r.status_code for r in responses] == [200, 200, 404, 200, 401, 401, 200, 503, 404]
            proxy.stop()  # every log line written
            exposed = proxy.log_text() + "".join(str(r.headers) + r.text for r in responses)
        for user, password in secrets.values():
            assert password not in exposed
            assert base64.b64encode(f"{user}:{password}".encode()).decode() not in exposed
