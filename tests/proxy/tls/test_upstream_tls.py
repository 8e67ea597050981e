"""Upstreams over TLS: Debian's docker-registry serving HTTPS with a private CA and requiring
client certificates, mirrored with `ca_file` and `client_cert`; what the mirror says when
either is missing; `insecure_skip_verify`; the operating system's trust store by default."""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import truststore

from proxy import config as configuration
from proxy import tls
from proxy.config import ConfigError, UpstreamConfig
from proxy.upstream.client import Upstream, UpstreamUnavailable
from tests.e2e.test_clients import assert_same_image
from tests.support.certs import PKI, KeyPair
from tests.support.clients import skopeo_copy
from tests.support.images import PushedImage
from tests.support.proxy import Proxy, to_toml
from tests.support.registry import Registry


def images(upstream: Registry) -> dict[str, PushedImage]:
    return upstream.images  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("internal-ca"), name="internal-ca")


@pytest.fixture(scope="module")
def mirror_pair(pki: PKI) -> KeyPair:
    """The client certificate the mirror presents to the registry."""
    return pki.client("pullproxy", "mirrors", stem="mirror")


@pytest.fixture(scope="module")
def private_registry(upstream: Registry, pki: PKI, mirror_pair: KeyPair) -> Iterator[Registry]:
    """distribution over HTTPS, its certificate from the private CA, client certificates required;
    it serves the seeded upstream's storage (read only)."""
    served = pki.server("127.0.0.1", stem="registry")
    tls_config = {"certificate": str(served.cert), "key": str(served.key), "clientcas": [str(pki.ca_cert)]}
    with Registry(tls=tls_config, storage=upstream.storage, verify=pki.context(mirror_pair)) as registry:
        yield registry


@pytest.fixture(scope="module")
def mirror(private_registry: Registry, pki: PKI, mirror_pair: KeyPair) -> Iterator[Proxy]:
    """One registry under four names: trusted with its CA and a client certificate, without the CA,
    without the client certificate, and not verified at all."""
    url, ca = private_registry.url, str(pki.ca_cert)
    pair = {"client_cert": str(mirror_pair.cert), "client_key": str(mirror_pair.key)}
    config = {
        "upstream": [
            {"name": "registry.internal", "url": url, "ca_file": ca, **pair},
            {"name": "noca.internal", "url": url, **pair},
            {"name": "nocert.internal", "url": url, "ca_file": ca},
            {"name": "skip.internal", "url": url, "insecure_skip_verify": True, **pair},
        ]
    }
    with Proxy(config) as proxy:
        yield proxy


def test_a_private_registry_with_its_own_ca_and_client_certificates_is_mirrored(
    upstream: Registry, mirror: Proxy, tmp_path: Path
) -> None:
    alpine = images(upstream)["alpine"]
    skopeo_copy(f"docker://{mirror.host}/registry.internal/{alpine.repo}:latest", f"dir:{tmp_path / 'out'}")
    assert_same_image(tmp_path / "out", alpine)
    big = images(upstream)["big"]  # a blob streamed through the mutual-TLS connection
    layer = max(big.blobs, key=lambda blob: blob.size)
    answer = httpx.get(f"{mirror.url}/v2/registry.internal/{big.repo}/blobs/{layer.digest}", timeout=60)
    assert answer.status_code == 200 and len(answer.content) == layer.size


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("noca.internal", "TLS: x509: certificate signed by unknown authority (trust its CA with ca_file)"),
        ("nocert.internal", "TLS: the registry requires a client certificate (set client_cert and client_key)"),
    ],
)
def test_a_tls_failure_says_why_in_the_oci_error_and_the_log(
    upstream: Registry, mirror: Proxy, name: str, says: str
) -> None:
    alpine = images(upstream)["alpine"]
    answer = httpx.get(f"{mirror.url}/v2/{name}/{alpine.repo}/manifests/latest", timeout=30)
    assert answer.status_code == 503
    (error,) = answer.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"].startswith(f"{name}: {says}")
    assert any(
        '"event": "upstream request failed"' in line and f'"upstream": "{name}"' in line and says in line
        for line in mirror.log_text().splitlines()
    )
    state = next(u for u in httpx.get(f"{mirror.url}/readyz", timeout=10).json()["upstreams"] if u["name"] == name)
    assert state["state"] == "failing" and says in state["last_error"]["what"]


def test_insecure_skip_verify_pulls_and_is_warned_about_at_start_up_and_on_the_status_page(
    upstream: Registry, mirror: Proxy
) -> None:
    alpine = images(upstream)["alpine"]
    assert httpx.get(f"{mirror.url}/v2/skip.internal/{alpine.repo}/manifests/latest", timeout=30).status_code == 200
    assert any(
        "insecure_skip_verify" in line and '"upstream": "skip.internal"' in line and '"level": "warning"' in line
        for line in mirror.log_text().splitlines()
    )
    states = {u["name"]: u["tls"] for u in httpx.get(f"{mirror.url}/readyz", timeout=10).json()["upstreams"]}
    assert states == {
        "registry.internal": "verified",
        "noca.internal": "verified",
        "nocert.internal": "verified",
        "skip.internal": "not verified",
    }
    page = httpx.get(f"{mirror.url}/", timeout=10).text
    rows = re.findall(r"<tr><td><b>([^<]+)</b>(.*?)</tr>", page, re.DOTALL)
    assert [name for name, row in rows if "TLS not verified" in row] == ["skip.internal"]


def test_the_operating_systems_trust_store_is_the_default(
    upstream: Registry,
    private_registry: Registry,
    pki: PKI,
    mirror_pair: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """truststore: OpenSSL's system store on Linux (what update-ca-certificates manages), the
    platform's verifier on macOS and Windows. SSL_CERT_FILE stands in for the system store here."""
    config = UpstreamConfig(
        name="registry.internal", url=private_registry.url, client_cert=mirror_pair.cert, client_key=mirror_pair.key
    )
    context = tls.upstream_context(config)
    if isinstance(context, truststore.SSLContext):  # macOS, Windows, or no store where OpenSSL looks
        assert not sys.platform.startswith("linux") or ssl.get_default_verify_paths().cafile is None
    else:  # the same store as OpenSSL's default, not a bundled list
        system = ssl.create_default_context().get_ca_certs(binary_form=True)
        assert system and set(context.get_ca_certs(binary_form=True)) == set(system)
    alpine = images(upstream)["alpine"]

    async def head() -> str | None:
        remote = Upstream(config)
        try:
            return await remote.head_manifest(alpine.repo, "latest")
        finally:
            await remote.aclose()

    with pytest.raises(UpstreamUnavailable, match="unknown authority"):
        asyncio.run(head())
    system = tmp_path / "system-store.pem"
    system.write_bytes(
        Path(ssl.get_default_verify_paths().cafile or "/dev/null").read_bytes() + pki.ca_cert.read_bytes()
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(system))
    assert asyncio.run(head()) == alpine.digest


def test_tls_failures_are_worded_like_go_clients() -> None:
    def verification(code: int, message: str) -> ssl.SSLCertVerificationError:
        error = ssl.SSLCertVerificationError(1, message)
        error.verify_code, error.verify_message = code, message
        return error

    def alert(reason: str) -> ssl.SSLError:
        error = ssl.SSLError(1, reason)
        error.reason = reason
        return error

    def said(exc: BaseException, client: bool = False) -> tls.TLSFailure | None:
        wrapped = httpx.ConnectError("failed")  # as httpx raises it
        wrapped.__cause__ = exc
        found = tls.classify_failure(wrapped, client)
        return found[0] if found else None

    assert said(verification(20, "unable to get local issuer certificate")) is tls.TLSFailure.UNKNOWN_AUTHORITY
    assert said(verification(19, "self-signed certificate in certificate chain")) is tls.TLSFailure.UNKNOWN_AUTHORITY
    assert said(verification(10, "certificate has expired")) is tls.TLSFailure.EXPIRED
    assert said(verification(62, "Hostname mismatch")) is tls.TLSFailure.WRONG_NAME
    assert said(alert("TLSV13_ALERT_CERTIFICATE_REQUIRED")) is tls.TLSFailure.CLIENT_CERT_REQUIRED
    assert said(alert("SSLV3_ALERT_BAD_CERTIFICATE"), client=True) is tls.TLSFailure.CLIENT_CERT_REFUSED
    assert said(alert("WRONG_VERSION_NUMBER")) is tls.TLSFailure.NOT_TLS
    assert said(ConnectionRefusedError(111, "refused")) is None


def test_upstream_tls_settings_are_checked_at_start_up(pki: PKI, mirror_pair: KeyPair, tmp_path: Path) -> None:
    other = pki.client("other")

    def load(**keys: object) -> configuration.Config:
        path = tmp_path / "c.toml"
        path.write_text(to_toml({"upstream": [{"name": "r.internal", "url": "https://r.internal", **keys}]}))
        return configuration.load(path, environ={})

    cases: list[tuple[dict[str, object], str]] = [
        ({"ca_file": tmp_path / "missing.pem"}, "upstream[0].ca_file: cannot read"),
        ({"client_cert": mirror_pair.cert}, "upstream[0]: client_cert and client_key go together"),
        ({"client_cert": mirror_pair.cert, "client_key": other.key}, "upstream[0].client_key: "),
        ({"insecure_skip_verify": "yes please"}, "upstream[0].insecure_skip_verify: "),
        ({"insecure_skip_verify": True, "ca_file": pki.ca_cert}, "insecure_skip_verify = true ignores ca_file"),
    ]
    for keys, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(**keys)
    loaded = load(ca_file=pki.ca_cert, client_cert=mirror_pair.cert, client_key=mirror_pair.key).upstreams[0]
    assert (loaded.ca_file, loaded.client_cert, loaded.client_key) == (pki.ca_cert, mirror_pair.cert, mirror_pair.key)
    assert loaded.insecure_skip_verify is False


def test_the_system_store_is_read_once_not_at_every_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading it takes tens of milliseconds of CPU, on the event loop when a connection opens."""
    loads = []
    original = ssl.SSLContext.set_default_verify_paths

    def counted(self: ssl.SSLContext) -> None:
        loads.append(1)
        original(self)

    monkeypatch.setattr(ssl.SSLContext, "set_default_verify_paths", counted)
    context = tls.upstream_context(UpstreamConfig(name="r.internal", url="https://r.internal"))
    created = len(loads)
    for _ in range(5):  # what anyio does for each new connection
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="r.internal")
    assert len(loads) == created
