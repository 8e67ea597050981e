"""The mirror over HTTPS: real clients trusting only a test CA (no insecure flag anywhere),
logins whose credentials never cross in clear, client certificates as users, rotation
without a restart, and what /readyz, the status page and /metrics say about it."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from proxy import config as configuration
from proxy import tls
from proxy.access.gate import Gate
from proxy.access.policy import Policy
from proxy.access.throttle import LoginThrottle
from proxy.access.tokens import Tokens
from proxy.access.users import Users
from proxy.config import ConfigError, Network
from tests.e2e.test_clients import assert_same_image
from tests.support.auth import challenge, claims, error_code, user_entry
from tests.support.certs import PKI, KeyPair
from tests.support.clients import (
    CommandError,
    Containerd,
    docker_daemon_pull,
    run,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)
from tests.support.images import PushedImage
from tests.support.proxy import REPO_ROOT, Proxy
from tests.support.registry import Registry

ALICE = ("alice", "alice-pw")
PODMAN = "/usr/bin/podman"


def images(upstream: Registry) -> dict[str, PushedImage]:
    return upstream.images  # type: ignore[attr-defined]


def served_certificate(host: str, port: int, pki: PKI, client: KeyPair | None = None) -> str:
    """SHA-256 of the certificate a new connection gets."""
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        pki.context(client).wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def expiry_metric(proxy: Proxy, pki: PKI) -> float:
    scrape = httpx.get(f"{proxy.url}/metrics", verify=pki.context(), timeout=10).text
    value = re.search(r"^pullproxy_tls_certificate_expiry_timestamp_seconds (\S+)$", scrape, re.MULTILINE)
    assert value is not None, scrape
    return float(value.group(1))


def fingerprint(pair: KeyPair) -> str:
    return tls.read_pair(pair.cert, pair.key).info.sha256


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_proxy(upstream: Registry, pki: PKI) -> Iterator[Proxy]:
    """HTTPS with the test CA's certificate; official images public, acme for those who log in."""
    pair = pki.server(stem="mirror")
    config = {
        "server": {"tls_cert": str(pair.cert), "tls_key": str(pair.key)},
        "upstream": [{"name": "docker.io", "url": upstream.url, "default": True}],
        "auth": {"user": [user_entry(ALICE)]},
        "access": [
            {"repository": "docker.io/library/*", "pull": "anyone"},
            {"repository": "docker.io/acme/**", "pull": "authenticated"},
        ],
    }
    with Proxy(config, verify=pki.context()) as proxy:
        yield proxy


# -- clients over HTTPS -------------------------------------------------------------------


def test_skopeo_pulls_over_https_trusting_the_ca_and_refuses_without_it(
    upstream: Registry, https_proxy: Proxy, pki: PKI, tmp_path: Path
) -> None:
    alpine = images(upstream)["alpine"]
    cert_dir = pki.cert_dir(tmp_path / "certs")
    skopeo_copy(f"docker://{https_proxy.host}/{alpine.repo}:latest", f"dir:{tmp_path / 'direct'}", cert_dir=cert_dir)
    assert_same_image(tmp_path / "direct", alpine)

    # As a registries.conf mirror of docker.io, with no `insecure` anywhere.
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", https_proxy.host, insecure=False)
    assert "insecure" not in conf.read_text()
    skopeo_copy(
        "docker://docker.io/library/alpine:latest",
        f"dir:{tmp_path / 'mirror'}",
        registries_conf=conf,
        cert_dir=cert_dir,
    )
    assert_same_image(tmp_path / "mirror", alpine)

    with pytest.raises(CommandError) as refused:  # TLS verified against the system's CAs only
        run(["/usr/bin/skopeo", "inspect", "--raw", f"docker://{https_proxy.host}/{alpine.repo}:latest"])
    assert "x509: certificate signed by unknown authority" in refused.value.stderr


@pytest.mark.skipif(not os.path.exists(PODMAN), reason="podman is not installed (apt-get install podman)")
def test_podman_pulls_from_an_https_mirror_in_registries_conf(
    upstream: Registry, https_proxy: Proxy, pki: PKI, tmp_path: Path
) -> None:
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", https_proxy.host, insecure=False)
    cert_dir = pki.cert_dir(tmp_path / "certs")
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    with tempfile.TemporaryDirectory(prefix="pdm", dir="/tmp") as short:  # podman wants a short runroot
        storage = [f"--{name}={short}/{name}" for name in ("root", "runroot", "tmpdir")]
        podman = [PODMAN, *storage, "--storage-driver=vfs", "--events-backend=none", "--cgroup-manager=cgroupfs"]
        pulled = subprocess.run(
            [*podman, "pull", "--cert-dir", str(cert_dir), "docker.io/library/alpine:latest"],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )
    assert pulled.returncode == 0, pulled.stderr.decode()
    alpine = images(upstream)["alpine"]
    assert alpine.config is not None
    config_digest = hashlib.sha256(alpine.config).hexdigest()
    assert pulled.stdout.decode().strip() == config_digest  # podman prints the image id
    assert f'"path": "/v2/library/alpine/blobs/sha256:{config_digest}"' in https_proxy.log_text()


def test_containerd_pulls_over_https_with_the_ca_in_hosts_toml(
    upstream: Registry, https_proxy: Proxy, pki: PKI, containerd: Containerd
) -> None:
    alpine = images(upstream)["alpine"]
    hosts = write_hosts_toml(containerd.hosts_dir, "docker.io", https_proxy.url, ca=pki.ca_cert)
    assert "skip_verify" not in hosts.read_text()
    containerd.pull("docker.io/library/alpine:latest")
    assert containerd.images()["docker.io/library/alpine:latest"] == alpine.digest


class DockerTokenAuth(httpx.Auth):
    """The Docker daemon's answer to a Bearer challenge: a token from the realm, asked with Basic."""

    def __init__(self, user: tuple[str, str]) -> None:
        self.basic = "Basic " + base64.b64encode(":".join(user).encode()).decode()
        self.realms: list[str] = []
        self.token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        response = yield request
        if response.status_code != 401:
            return
        params = challenge(response)
        self.realms.append(params["realm"])
        query = {"service": params["service"], "account": "alice", "client_id": "docker", "offline_token": "true"}
        if "scope" in params:
            query["scope"] = params["scope"]
        token = yield httpx.Request("GET", params["realm"], params=query, headers={"Authorization": self.basic})
        assert token.status_code == 200, token.text
        token.read()
        self.token = token.json()["token"]
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def test_docker_login_and_pull_over_https_keep_credentials_off_plain_http(
    upstream: Registry, https_proxy: Proxy, pki: PKI
) -> None:
    """No Docker engine runs here: these are the requests dockerd sends with certs.d/<host:port>/ca.crt."""
    verify = pki.context()
    # `docker login 127.0.0.1:PORT`: GET /v2/ -> 401 Bearer -> GET <realm> with Basic -> GET /v2/ with the token.
    with httpx.Client(verify=verify, timeout=30) as client:
        ping = client.get(f"{https_proxy.url}/v2/")
        assert ping.status_code == 401
        realm = challenge(ping)["realm"]
        assert realm == f"https://{https_proxy.host}/token"
        login = DockerTokenAuth(ALICE)
        assert client.get(f"{https_proxy.url}/v2/", auth=login).status_code == 200

    private = images(upstream)["docker"]
    auth = DockerTokenAuth(ALICE)
    pulled = docker_daemon_pull(https_proxy.url, private.repo, "latest", auth=auth, verify=verify)
    assert pulled.tag_digest == private.digest
    assert auth.realms and all(r.startswith(f"https://{https_proxy.host}/token") for r in auth.realms)

    # There is no plain-HTTP listener that credentials could be sent to by mistake.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{https_proxy.host}/v2/", auth=ALICE, timeout=5)


def test_readyz_status_page_and_metrics_tell_that_tls_is_on_and_when_it_expires(https_proxy: Proxy, pki: PKI) -> None:
    pair = tls.read_pair(Path(https_proxy.config["server"]["tls_cert"]), Path(https_proxy.config["server"]["tls_key"]))
    ready = httpx.get(f"{https_proxy.url}/readyz", verify=pki.context(), timeout=10).json()
    assert ready["tls"]["enabled"] is True and ready["tls"]["client_certificates"] == "none"
    assert ready["tls"]["certificate"]["not_after"] == pair.info.not_after
    assert ready["tls"]["certificate"]["sha256"] == pair.info.sha256
    assert ready["upstreams"][0]["tls"] == "plain http"

    page = httpx.get(f"{https_proxy.url}/", verify=pki.context(), timeout=10).text
    section = re.search(r'<section id="tls">(.*?)</section>', page, re.DOTALL)
    assert section is not None
    expires = datetime.datetime.fromtimestamp(pair.info.not_after, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert "HTTPS" in section.group(1) and f"Certificate expires {expires} UTC" in section.group(1)

    assert expiry_metric(https_proxy, pki) == pair.info.not_after


def test_plain_http_stays_the_default_and_says_so(upstream: Registry, proxy_factory: Callable[..., Proxy]) -> None:
    config = configuration.load(None, environ={})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (None, None, None)
    assert tls.uvicorn_options(config) == {}

    proxy = proxy_factory(upstream_url=upstream.url)
    assert proxy.url.startswith("http://")
    assert httpx.get(f"{proxy.url}/readyz", timeout=10).json()["tls"] == {"enabled": False}
    assert "plain HTTP" in httpx.get(f"{proxy.url}/", timeout=10).text
    assert "pullproxy_tls_certificate_expiry" not in httpx.get(f"{proxy.url}/metrics", timeout=10).text


# -- client certificates ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("clients"), name="clients-ca")


@pytest.fixture(scope="module")
def mtls_proxy(upstream: Registry, pki: PKI, clients_pki: PKI) -> Iterator[Proxy]:
    """Client certificates required; acme is for group ci (a certificate's O) and for alice."""
    pair = pki.server(stem="mtls-mirror")
    node = clients_pki.client("node-1", "ci", stem="node-1")
    config = {
        "server": {"tls_cert": str(pair.cert), "tls_key": str(pair.key), "tls_client_ca": str(clients_pki.ca_cert)},
        "upstream": [{"name": "docker.io", "url": upstream.url, "default": True}],
        "auth": {"user": [user_entry(ALICE)]},
        "access": [
            {"repository": "docker.io/library/*", "pull": "anyone"},
            {"repository": "docker.io/acme/**", "pull": ["group:ci", "alice"]},
        ],
    }
    with Proxy(config, verify=pki.context(node)) as proxy:
        yield proxy


def test_a_client_certificate_stands_for_its_subject_in_access_rules(
    upstream: Registry, mtls_proxy: Proxy, pki: PKI, clients_pki: PKI, tmp_path: Path
) -> None:
    private = images(upstream)["docker"]
    node = clients_pki.client("node-2", "ci")
    cert_dir = pki.cert_dir(tmp_path / "certs", node)  # ca.crt, client.cert, client.key
    skopeo_copy(f"docker://{mtls_proxy.host}/{private.repo}:latest", f"dir:{tmp_path / 'out'}", cert_dir=cert_dir)
    assert_same_image(tmp_path / "out", private)
    assert any(
        f'"path": "/v2/{private.repo}/manifests/latest"' in line and '"user": "node-2"' in line
        for line in mtls_proxy.log_text().splitlines()
    )

    # CN=guest is not in group ci: refused, unless its holder logs in as someone who may.
    guest = clients_pki.client("guest", "visitors")
    with httpx.Client(verify=pki.context(guest), timeout=10) as client:
        assert client.get(f"{mtls_proxy.url}/v2/").status_code == 200  # the certificate is a credential
        denied = client.get(f"{mtls_proxy.url}/v2/{private.repo}/manifests/latest")
        assert denied.status_code == 403 and error_code(denied) == "DENIED"
        allowed = client.get(f"{mtls_proxy.url}/v2/{private.repo}/manifests/latest", auth=ALICE)
        assert allowed.status_code == 200
        scope = {"scope": f"repository:{private.repo}:pull"}
        token = client.get(f"{mtls_proxy.url}/token", params=scope).json()["token"]
        assert (claims(token)["sub"], claims(token)["access"]) == ("guest", [])  # a token for the holder
    node = clients_pki.client("node-3", "ci")
    with httpx.Client(verify=pki.context(node), timeout=10) as client:
        token = client.get(f"{mtls_proxy.url}/token", params=scope).json()["token"]
        assert claims(token)["sub"] == "node-3" and claims(token)["access"][0]["name"] == f"docker.io/{private.repo}"


def test_without_a_client_certificate_nothing_but_the_probes_is_served(
    upstream: Registry, mtls_proxy: Proxy, pki: PKI, tmp_path: Path
) -> None:
    public = images(upstream)["alpine"]
    source = f"docker://{mtls_proxy.host}/{public.repo}:latest"
    with pytest.raises(CommandError) as refused:
        skopeo_copy(source, f"dir:{tmp_path / 'none'}", cert_dir=pki.cert_dir(tmp_path / "ca-only"))
    assert "403 (Forbidden)" in refused.value.stderr
    with httpx.Client(verify=pki.context(), timeout=10) as client:  # no client certificate
        for path in ("/v2/", f"/v2/{public.repo}/manifests/latest", "/token", "/", "/metrics"):
            answer = client.get(f"{mtls_proxy.url}{path}")
            assert answer.status_code == 403 and error_code(answer) == "DENIED", path
            assert "requires a TLS client certificate" in answer.json()["errors"][0]["message"]
        assert client.get(f"{mtls_proxy.url}/healthz").status_code == 200  # load balancers have no certificate
        assert client.get(f"{mtls_proxy.url}/readyz").json()["tls"]["client_certificates"] == "required"
    assert '"event": "refused: no client certificate", "level": "warning"' in mtls_proxy.log_text()

    stranger = PKI(tmp_path / "other").client("node-9", "ci")  # signed by a CA the mirror does not trust
    with pytest.raises(CommandError):  # the handshake fails (the client sees the connection close)
        skopeo_copy(source, f"dir:{tmp_path / 'other'}", cert_dir=pki.cert_dir(tmp_path / "stranger", stranger))
    assert not (tmp_path / "other" / "manifest.json").exists()


def test_without_the_mixin_the_handshake_itself_requires_a_client_certificate(pki: PKI, clients_pki: PKI) -> None:
    """A protocol class that cannot refuse in HTTP gets a context that refuses in TLS."""

    class Plain:
        http_protocol_class = object

    class Refusing:
        http_protocol_class = tls.PeerCertificateProtocol

    served = pki.server()
    strict = tls.server._uvicorn_context(
        served.cert, served.key, clients_pki.ca_cert, Plain(), ssl.create_default_context
    )
    lenient = tls.server._uvicorn_context(
        served.cert, served.key, clients_pki.ca_cert, Refusing(), ssl.create_default_context
    )
    assert (strict.verify_mode, lenient.verify_mode) == (ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL)


# -- rotation ---------------------------------------------------------------------------


def _wait_for_certificate(proxy: Proxy, pki: PKI, expected: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := served_certificate("127.0.0.1", proxy.port, pki)) != expected:
        assert time.monotonic() < deadline, f"still serving {seen} after {timeout}s"
        time.sleep(0.2)


def _replace(target: KeyPair, source: KeyPair) -> None:
    """As cert-manager and certbot do: new files renamed into place, the certificate first."""
    for old, new in ((target.cert, source.cert), (target.key, source.key)):
        staged = old.with_suffix(".new")
        staged.write_bytes(new.read_bytes())
        os.replace(staged, old)


def test_certificate_rotates_without_restart_while_a_long_pull_runs(
    upstream: Registry, pki: PKI, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    served = pki.server(stem="rotating")
    first = fingerprint(served)
    proxy = proxy_factory(
        {"server": {"tls_cert": str(served.cert), "tls_key": str(served.key)}},
        upstream_url=upstream.url,
        verify=pki.context(),
    )
    big = images(upstream)["big"]
    layer = max(big.blobs, key=lambda blob: blob.size)
    httpx.get(f"{proxy.url}/v2/{big.repo}/blobs/{layer.digest}", verify=pki.context(), timeout=60).raise_for_status()

    renewed = pki.server(stem="renewed", not_after=datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC))
    digest = hashlib.sha256()
    with (
        httpx.Client(verify=pki.context(), timeout=60) as client,
        client.stream("GET", f"{proxy.url}/v2/{big.repo}/blobs/{layer.digest}") as response,
    ):
        chunks = response.iter_raw(64 << 10)
        digest.update(next(chunks))  # the pull is under way, on a connection made with the old certificate
        _replace(served, renewed)
        _wait_for_certificate(proxy, pki, fingerprint(renewed))
        for chunk in chunks:
            digest.update(chunk)
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        old_der = ssl_object.getpeercert(True)
    assert f"sha256:{digest.hexdigest()}" == layer.digest  # completed, undisturbed
    assert hashlib.sha256(old_der).hexdigest() == first

    ready = httpx.get(f"{proxy.url}/readyz", verify=pki.context(), timeout=10).json()
    assert ready["tls"]["certificate"]["sha256"] == fingerprint(renewed)
    assert ready["tls"]["certificate"]["expires"] == "2031-01-01T00:00:00+00:00"
    assert expiry_metric(proxy, pki) == datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert '"event": "TLS certificate rotated"' in proxy.log_text()
    assert "TLS certificate not rotated" not in proxy.log_text()  # the moment between the two files is no error


def test_a_bad_rotation_keeps_the_old_certificate_and_logs_why(
    upstream: Registry, pki: PKI, proxy_factory: Callable[..., Proxy]
) -> None:
    served = pki.server(stem="kept")
    proxy = proxy_factory(
        {"server": {"tls_cert": str(served.cert), "tls_key": str(served.key)}},
        upstream_url=upstream.url,
        verify=pki.context(),
    )
    first = fingerprint(served)
    other = pki.server(stem="mismatched")
    served.key.write_bytes(other.key.read_bytes())  # a key that does not belong to the certificate

    deadline = time.monotonic() + 15
    while "TLS certificate not rotated" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_text()[-2000:]
        time.sleep(0.2)
    line = next(line for line in proxy.log_text().splitlines() if "TLS certificate not rotated" in line)
    assert f"{served.key} does not match the certificate in {served.cert}" in line
    assert served_certificate("127.0.0.1", proxy.port, pki) == first
    ready = httpx.get(f"{proxy.url}/readyz", verify=pki.context(), timeout=10).json()
    assert "does not match" in ready["tls"]["rotation_error"]["why"]
    page = httpx.get(f"{proxy.url}/", verify=pki.context(), timeout=10).text
    assert "rotation failed" in page and "the certificate above is still served" in page

    served.key.write_bytes(other.key.read_bytes())
    served.cert.write_bytes(other.cert.read_bytes())  # the pair made whole again
    _wait_for_certificate(proxy, pki, fingerprint(other))
    assert httpx.get(f"{proxy.url}/readyz", verify=pki.context(), timeout=10).json()["tls"]["rotation_error"] is None


# -- start-up -----------------------------------------------------------------------------


def test_a_bad_or_mismatched_pair_stops_start_up_with_one_line(pki: PKI, tmp_path: Path) -> None:
    served, other = pki.server(), pki.server()
    config = tmp_path / "pullproxy.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:1"\ntls_cert = "{served.cert}"\ntls_key = "{other.key}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2
    assert started.stderr.decode().splitlines() == [
        f"pullproxy: configuration error: server.tls_key: {other.key} does not match the certificate in {served.cert}"
        " (their public keys differ)"
    ]


def _load_server(tmp_path: Path, **server: str) -> configuration.Config:
    path = tmp_path / "c.toml"
    path.write_text("[server]\n" + "".join(f'{k} = "{v}"\n' for k, v in server.items()))
    return configuration.load(path, environ={})


def test_tls_settings_are_checked_at_start_up(pki: PKI, tmp_path: Path) -> None:
    served = pki.server()
    chain_first = tmp_path / "wrong-order.pem"
    chain_first.write_bytes(pki.ca_cert.read_bytes() + served.cert.read_bytes())
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases: list[tuple[dict[str, str], str]] = [
        ({"tls_cert": str(served.cert)}, "server: tls_cert and tls_key go together"),
        ({"tls_cert": str(tmp_path / "missing.crt"), "tls_key": str(served.key)}, "server.tls_cert: cannot read"),
        ({"tls_cert": str(garbage), "tls_key": str(served.key)}, "server.tls_cert: " + f"{garbage} holds no PEM"),
        ({"tls_cert": str(served.cert), "tls_key": str(garbage)}, "server.tls_key: " + f"{garbage} holds no PEM"),
        ({"tls_cert": str(chain_first), "tls_key": str(served.key)}, "is not first; put the leaf first"),
        ({"tls_client_ca": str(pki.ca_cert)}, "server.tls_client_ca: needs tls_cert and tls_key"),
        (
            {"tls_cert": str(served.cert), "tls_key": str(served.key), "tls_client_ca": str(garbage)},
            "server.tls_client_ca: " + f"{garbage} holds no PEM",
        ),
    ]
    for server, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _load_server(tmp_path, **server)
    loaded = _load_server(tmp_path, tls_cert=str(served.cert), tls_key=str(served.key), tls_client_ca=str(pki.ca_cert))
    assert (loaded.tls_cert, loaded.tls_key, loaded.tls_client_ca) == (served.cert, served.key, pki.ca_cert)
    # Certificates name users and groups, so rules may name them without [auth].
    path = tmp_path / "rules.toml"
    path.write_text(
        f'[server]\ntls_cert = "{served.cert}"\ntls_key = "{served.key}"\ntls_client_ca = "{pki.ca_cert}"\n'
        '[[access]]\nrepository = "docker.io/**"\npull = ["group:ci", "node-1"]\n'
    )
    assert configuration.load(path, environ={}).access[0].pull == ("group:ci", "node-1")
    path.write_text('[[access]]\nrepository = "docker.io/**"\npull = ["group:ci"]\n')
    with pytest.raises(ConfigError, match="naming users needs an"):
        configuration.load(path, environ={})


# -- the token realm ----------------------------------------------------------------------


def _request(scheme: str, peer: str, headers: dict[str, str]) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/v2/",
        "query_string": b"",
        "scheme": scheme,
        "server": ("127.0.0.1", 5000),
        "client": (peer, 40000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "mirror.internal:5000", **headers}.items()],
    }
    return Request(scope)


def test_the_realm_is_https_over_tls_or_when_a_trusted_proxy_says_so(tmp_path: Path) -> None:
    trusted: list[Network] = [ipaddress.ip_network("10.1.0.0/24")]
    gate = Gate(Policy([], "anyone"), Users([], None, LoginThrottle()), Tokens(b"k" * 32, 300), trusted)

    def realm(request: Request) -> str:
        return challenge_of(gate.challenge(request, None, "authentication required").challenge)

    assert realm(_request("https", "192.0.2.7", {})) == "https://mirror.internal:5000/token"
    assert realm(_request("http", "192.0.2.7", {})) == "http://mirror.internal:5000/token"
    forwarded = {"x-forwarded-proto": "https"}
    assert realm(_request("http", "10.1.0.5", forwarded)) == "https://mirror.internal:5000/token"
    assert realm(_request("http", "192.0.2.7", forwarded)) == "http://mirror.internal:5000/token"  # not trusted


def challenge_of(header: str) -> str:
    match = re.search(r'realm="([^"]+)"', header)
    assert match is not None
    return match.group(1)


def test_the_certificate_subject_names_a_user_and_groups() -> None:
    name = "CN=node-1,O=ci,O=gpu,C=DE"
    identity = tls.client_identity({"extensions": {"tls": {"client_cert_name": name}}})
    assert identity == tls.Identity("node-1", frozenset({"ci", "gpu"}))
    assert tls.client_identity({"extensions": {"tls": {"client_cert_name": "O=no common name"}}}) is None
    assert tls.client_identity({"extensions": {"tls": {"client_cert_name": None}}}) is None
    assert tls.client_identity({}) is None
