"""TLS: the listener's certificate (checked, rotated, described), client certificates, upstream trust.

Serving: uvicorn hands one `ssl.SSLContext` to the event loop for every connection.
Loading a new pair into that same context changes what *new* handshakes present and
leaves established connections alone, so rotation is a look at the files' identity
every second; a changed pair is read and checked on a scratch context first (a bad one
keeps the old certificate, and says why), then loaded into the live context on the
event loop's thread, where handshakes begin, so none ever sees half a pair. The pair is
loaded from private copies of the bytes that were checked, not from the paths again,
which may have changed in between.

Client certificates: `PeerCertificate` is a mixin for uvicorn's HTTP protocol classes that
puts the ASGI TLS extension (`scope["extensions"]["tls"]`) into each request of a
connection; `client_identity` turns its verified subject into a user name and groups.

Upstreams: the operating system's trust store through `truststore`, plus an upstream's
`ca_file`; a verification failure is described as Go clients do (`x509: ...`).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import os
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import truststore
from anyio import to_thread
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy import metrics
from proxy.errors import RegistryError

if TYPE_CHECKING:
    from proxy.config import Config, UpstreamConfig

log = structlog.get_logger("pullproxy")

ROTATION_INTERVAL = 1.0  # seconds between looks at the certificate files
EXPIRY_WARNING_DAYS = 14
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class Role(enum.Enum):
    """Which file of a TLS configuration a problem is about."""

    CERTIFICATE = "certificate"
    KEY = "key"
    CA = "ca"


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used, with what is wrong in one line."""

    def __init__(self, role: Role, message: str) -> None:
        super().__init__(message)
        self.role = role


# -- certificates and keys -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a person needs to know about a certificate: whose, by whom, until when."""

    subject: str  # RFC 4514, e.g. "CN=mirror.internal,O=Acme"
    issuer: str
    not_before: float  # Unix time
    not_after: float
    sha256: str  # fingerprint of the DER encoding, hex
    dns_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, certificate: x509.Certificate) -> CertificateInfo:
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(str(n) for n in san.get_values_for_type(x509.DNSName)) + tuple(
                str(ip) for ip in san.get_values_for_type(x509.IPAddress)
            )
        except x509.ExtensionNotFound:
            names = ()
        return cls(
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            not_before=certificate.not_valid_before_utc.timestamp(),
            not_after=certificate.not_valid_after_utc.timestamp(),
            sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            dns_names=names,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "names": list(self.dns_names),
            "not_after": self.not_after,
            "expires": datetime.fromtimestamp(self.not_after, UTC).isoformat(timespec="seconds"),
            "sha256": self.sha256,
        }


def _read(path: Path, role: Role) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(role, f"cannot read {path}: {exc.strerror or exc}") from None


def read_certificates(path: Path, role: Role = Role.CERTIFICATE) -> list[x509.Certificate]:
    """Every PEM certificate in `path`, in order; at least one."""
    data = _read(path, role)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSFileError(role, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certificates


def _read_key(path: Path) -> tuple[bytes, PrivateKeyTypes]:
    data = _read(path, Role.KEY)
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSFileError(Role.KEY, f"{path} is encrypted; give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSFileError(Role.KEY, f"{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)") from None


def _public(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclass(frozen=True, slots=True)
class Pair:
    """A certificate chain and its private key, checked to belong together."""

    chain: bytes  # PEM, leaf first
    key: bytes = field(repr=False)
    info: CertificateInfo


def read_pair(cert: Path, key: Path) -> Pair:
    """Read and check a certificate chain and its key (blocking); TLSFileError says what is wrong."""
    chain = read_certificates(cert)
    key_pem, private = _read_key(key)
    public = _public(private.public_key())
    if _public(chain[0].public_key()) != public:
        if any(_public(c.public_key()) == public for c in chain[1:]):
            message = f"{cert}: the certificate of {key} is not first; put the leaf first, then intermediates"
            raise TLSFileError(Role.CERTIFICATE, message)
        raise TLSFileError(Role.KEY, f"{key} does not match the certificate in {cert} (their public keys differ)")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return Pair(pem, key_pem, CertificateInfo.of(chain[0]))


class _Staged:
    """The pair as two private files (a 0700 folder), for `load_cert_chain`, which reads only paths."""

    def __init__(self, pair: Pair) -> None:
        self.folder = tempfile.mkdtemp(prefix="pullproxy-tls-")
        self.chain, self.key = os.path.join(self.folder, "chain.pem"), os.path.join(self.folder, "key.pem")
        try:
            for path, data in ((self.chain, pair.chain), (self.key, pair.key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
        except BaseException:
            self.remove()
            raise

    def load_into(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(self.chain, self.key)
        except ssl.SSLError as exc:  # e.g. a key type OpenSSL refuses
            raise TLSFileError(Role.KEY, f"OpenSSL cannot use this pair: {exc.reason or exc}") from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _load_chain(context: ssl.SSLContext, pair: Pair) -> None:
    staged = _Staged(pair)
    try:
        staged.load_into(context)
    finally:
        staged.remove()


# -- serving -------------------------------------------------------------------------


def _server_context(client_ca: Path | None, refused_in_http: bool = False) -> ssl.SSLContext:
    """`refused_in_http`: ask for a client certificate without requiring it in the handshake;
    `PeerCertificate` then refuses requests without one, with an error a person can read
    (a failed handshake reaches the client as a bare EOF: asyncio does not send the alert)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        read_certificates(client_ca, Role.CA)
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as exc:
            raise TLSFileError(Role.CA, f"{client_ca}: {exc.reason or exc}") from None
        context.verify_mode = ssl.CERT_OPTIONAL if refused_in_http else ssl.CERT_REQUIRED
    return context


def check_server_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """What `ServerTLS` would refuse, as a TLSFileError (for the configuration check)."""
    _load_chain(_server_context(client_ca), read_pair(cert, key))


def _file_id(path: Path) -> tuple[int, int, int, int] | None:
    """Follows symbolic links: certbot's live/ links and Kubernetes' ..data swap change the target."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class ServerTLS:
    """The listener's TLS context, and the certificate in it, kept current with the files."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None, refused_in_http: bool = False) -> None:
        self.cert_path = cert
        self.key_path = key
        self.client_ca = client_ca
        self.context = _server_context(client_ca, refused_in_http)
        ids = self._ids()
        pair = read_pair(cert, key)
        _load_chain(self.context, pair)
        self._loaded_ids = ids
        self._pending: object = None  # ids of a failed attempt, retried once before it counts
        self._rejected: object = None  # ids of a pair found bad: not read again until they change
        self.rotation_error: tuple[float, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._installed(pair.info)

    def _ids(self) -> tuple[object, object]:
        return (_file_id(self.cert_path), _file_id(self.key_path))

    def _installed(self, info: CertificateInfo) -> None:
        self.info = info
        self.loaded_at = time.time()
        metrics.tls_certificate_expiry(info.not_after)
        if info.not_after < self.loaded_at:
            log.warning("TLS certificate has expired", **self._log_fields())
        elif info.not_after < self.loaded_at + EXPIRY_WARNING_DAYS * 86400:
            log.warning("TLS certificate expires soon", **self._log_fields())

    def _log_fields(self) -> dict[str, object]:
        return {
            "cert": str(self.cert_path),
            "subject": self.info.subject,
            "expires": datetime.fromtimestamp(self.info.not_after, UTC).isoformat(timespec="seconds"),
            "sha256": self.info.sha256,
        }

    def _stage(self) -> tuple[Pair, _Staged]:
        """Blocking: read the pair, stage it, and load it into a scratch context, which is what could fail."""
        pair = read_pair(self.cert_path, self.key_path)
        staged = _Staged(pair)
        try:
            staged.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        except BaseException:
            staged.remove()
            raise
        return pair, staged

    async def check(self) -> bool:
        """Load the files if they changed and make a good pair; True when a new one is in place."""
        ids = await to_thread.run_sync(self._ids)
        if ids in (self._loaded_ids, self._rejected):
            return False
        try:
            pair, staged = await to_thread.run_sync(self._stage)
        except TLSFileError as exc:
            if ids != self._pending:  # perhaps caught between two writes (certbot replaces two links)
                self._pending = ids
                return False
            self._rejected = ids
            self.rotation_error = (time.time(), str(exc))
            log.error("TLS certificate not rotated, the current one stays", why=str(exc), **self._log_fields())
            return False
        try:
            # Here, on the event loop's thread, no handshake can begin halfway through the load
            # (load_cert_chain lets other threads run; a handshake starting on one would race).
            staged.load_into(self.context)
        finally:
            await to_thread.run_sync(staged.remove)
        self._loaded_ids, self._pending, self._rejected, self.rotation_error = ids, None, None, None
        changed = pair.info.sha256 != self.info.sha256
        self._installed(pair.info)
        if changed:
            log.info("TLS certificate rotated", **self._log_fields())
        return changed

    async def watch(self, interval: float = ROTATION_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:
                log.exception("checking the TLS certificate files failed")

    def start_watching(self) -> None:
        """Watch the files from the running event loop (uvicorn's, which serves the connections)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.warning("no event loop: the TLS certificate files are not watched", cert=str(self.cert_path))
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self.watch())

    def describe(self, now: float | None = None) -> dict[str, object]:
        """For `/readyz` and the status page."""
        now = time.time() if now is None else now
        error = self.rotation_error
        return {
            "enabled": True,
            "client_certificates": "required" if self.client_ca is not None else "none",
            "certificate": self.info.as_json(),
            "expires_in_days": round((self.info.not_after - now) / 86400, 1),
            "loaded_at": self.loaded_at,
            "rotation_error": None if error is None else {"at": error[0], "why": error[1]},
        }


_SERVING: dict[tuple[Path, Path, Path | None, bool], ServerTLS] = {}


def serving(cert: Path, key: Path, client_ca: Path | None, refused_in_http: bool = False) -> ServerTLS:
    """This process's listener TLS for these files (one per process; uvicorn workers each have theirs)."""
    found = _SERVING.get((cert, key, client_ca, refused_in_http))
    if found is None:
        found = _SERVING[(cert, key, client_ca, refused_in_http)] = ServerTLS(cert, key, client_ca, refused_in_http)
    return found


def current() -> ServerTLS | None:
    """The TLS of this process's listener, None when it speaks plain HTTP."""
    return next(iter(_SERVING.values()), None)


def describe_server() -> dict[str, object]:
    server = current()
    return server.describe() if server is not None else {"enabled": False}


def _uvicorn_context(
    cert: Path, key: Path, client_ca: Path | None, config: Any, default: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory`, called in each worker inside its running event loop.

    A missing client certificate is refused in HTTP only when the protocol class can do it
    (it has `PeerCertificate`); otherwise the handshake requires one.
    """
    protocol = getattr(config, "http_protocol_class", None)
    protocol = getattr(protocol, "protocol", protocol)  # `server.Protocols` makes its protocol's connections
    in_http = isinstance(protocol, type) and issubclass(protocol, PeerCertificate)
    try:
        server = serving(cert, key, client_ca, in_http)
    except TLSFileError as exc:  # the files changed since the configuration was checked
        log.error("cannot serve TLS", why=str(exc))
        raise SystemExit(2) from None
    server.start_watching()
    return server.context


def uvicorn_options(config: Config) -> dict[str, Any]:
    """What `uvicorn.run` needs for HTTPS (nothing for plain HTTP); picklable, for `--workers`."""
    if config.tls_cert is None or config.tls_key is None:
        return {}
    factory = functools.partial(_uvicorn_context, config.tls_cert, config.tls_key, config.tls_client_ca)
    return {"ssl_context_factory": factory}  # `server.serve_options` gives the protocol `PeerCertificate`


# -- client certificates ---------------------------------------------------------------


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, object]:
    """The ASGI TLS extension of one connection (https://asgi.readthedocs.io/en/latest/specs/tls.html)."""
    chain: list[str] = []
    name = None
    # A client sends a certificate only when asked, and it is asked only when it must be verified.
    der = ssl_object.getpeercert(binary_form=True) if ssl_object.context.verify_mode != ssl.CERT_NONE else None
    if der:
        certificate = x509.load_der_x509_certificate(der)
        chain = [certificate.public_bytes(serialization.Encoding.PEM).decode()]
        name = certificate.subject.rfc4514_string()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


PROBES = frozenset({"/healthz", "/readyz"})  # answered without a client certificate: load balancers have none


def _with_extension(app: ASGIApp, extension: dict[str, object], refuse: bool) -> ASGIApp:
    refusal = RegistryError(
        403,
        "DENIED",
        "this mirror requires a TLS client certificate signed by its client CA (server.tls_client_ca)",
    ).response()

    async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("extensions", {})["tls"] = extension
        if refuse and scope["type"] == "http" and scope["path"] not in PROBES:
            client = scope.get("client")
            log.warning(
                "refused: no client certificate",
                method=scope.get("method"),
                path=scope["path"],
                client=client[0] if client else None,
            )
            await refusal(scope, receive, send)
            return
        await app(scope, receive, send)

    return with_tls


class PeerCertificate(asyncio.Protocol):
    """Mixin for a uvicorn HTTP protocol class: every request of a TLS connection gets the
    ASGI TLS extension in its scope, worked out once when the connection is made (after the
    handshake), and where a client certificate was asked for but not given, a 403 saying so
    (`/healthz` and `/readyz` excepted). Put it first: `class P(PeerCertificate, HttpToolsProtocol)`."""

    app: ASGIApp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            extension = tls_extension(ssl_object)
            refuse = ssl_object.context.verify_mode == ssl.CERT_OPTIONAL and not extension["client_cert_chain"]
            self.app = _with_extension(self.app, extension, refuse)


def _protocol_base() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools if installed, else h11

    return AutoHTTPProtocol


class PeerCertificateProtocol(PeerCertificate, _protocol_base()):  # type: ignore[misc]
    """uvicorn's default HTTP protocol with `PeerCertificate`."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified client certificate says its holder is: Common Name, and Organizations as groups."""

    name: str
    groups: frozenset[str]


@functools.lru_cache(maxsize=4096)
def _identity(subject: str) -> Identity | None:
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError:
        return None
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not common or not str(common[0].value):
        return None
    groups = frozenset(str(a.value) for a in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) if a.value)
    return Identity(str(common[0].value), groups)


def client_identity(scope: Scope) -> Identity | None:
    """The holder of the connection's verified client certificate, if it has one with a Common Name."""
    extension = scope.get("extensions", {}).get("tls")
    subject = extension.get("client_cert_name") if extension else None
    return _identity(subject) if subject else None


# -- upstreams -------------------------------------------------------------------------


class UpstreamTrust(enum.StrEnum):
    """How pullproxy checks an upstream's certificate."""

    VERIFIED = "verified"  # the system's trust store (and ca_file)
    NOT_VERIFIED = "not verified"  # insecure_skip_verify
    PLAIN = "plain http"


def upstream_trust(config: UpstreamConfig) -> UpstreamTrust:
    if not config.url.startswith("https://"):
        return UpstreamTrust.PLAIN
    return UpstreamTrust.NOT_VERIFIED if config.insecure_skip_verify else UpstreamTrust.VERIFIED


def system_trust() -> ssl.SSLContext:
    """A client context trusting the operating system's store, the one its administrators manage.

    `truststore` asks the platform's verifier on macOS and Windows. On Linux it loads
    OpenSSL's configured store (/etc/ssl/certs, what update-ca-certificates writes) into the
    context again for every connection: tens of milliseconds of parsing on the event loop
    per new upstream connection. Where OpenSSL knows that store, the same store is loaded
    here once instead; truststore stays for the rest (it also searches the usual places).
    """
    if sys.platform.startswith("linux") and ssl.get_default_verify_paths().cafile:  # None if it does not exist
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.set_default_verify_paths()
        return context
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def upstream_context(config: UpstreamConfig) -> ssl.SSLContext:
    """The client context for one upstream (also used for its token realm)."""
    if config.insecure_skip_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("upstream TLS certificates are not verified (insecure_skip_verify)", upstream=config.name)
    else:
        context = system_trust()
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if config.client_cert is not None and config.client_key is not None:
        context.load_cert_chain(str(config.client_cert), str(config.client_key))
    return context


def check_upstream_files(ca_file: Path | None, client_cert: Path | None, client_key: Path | None) -> None:
    """What `upstream_context` would refuse, as a TLSFileError (for the configuration check)."""
    if ca_file is not None:
        read_certificates(ca_file, Role.CA)
    if client_cert is not None and client_key is not None:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), read_pair(client_cert, client_key))


class TLSFailure(enum.Enum):
    """Why a TLS connection to an upstream failed, worded like Go's clients (docker, containerd)."""

    UNKNOWN_AUTHORITY = "x509: certificate signed by unknown authority (trust its CA with ca_file)"
    EXPIRED = "x509: certificate has expired"
    NOT_YET_VALID = "x509: certificate is not yet valid"
    WRONG_NAME = "x509: certificate is not valid for this host"
    OTHER_VERIFICATION = "x509: certificate verification failed"
    CLIENT_CERT_REQUIRED = "the registry requires a client certificate (set client_cert and client_key)"
    CLIENT_CERT_REFUSED = "the registry refused pullproxy's client certificate"
    NOT_TLS = "the registry does not speak TLS on this port (an http:// url?)"
    HANDSHAKE = "TLS handshake failed"


_UNKNOWN_AUTHORITY = {2, 18, 19, 20, 21}  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT(_LOCALLY), self-signed...
_EXPIRED, _NOT_YET_VALID = 10, 9
_WRONG_NAME = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "TLSV1_ALERT_ACCESS_DENIED",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify_failure(exc: BaseException, has_client_cert: bool) -> tuple[TLSFailure, str] | None:
    """The TLS problem behind a failed upstream request, with OpenSSL's own words; None if it was none."""
    for error in _causes(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            code = error.verify_code
            detail = str(error.verify_message or error.reason or "")
            if code in _UNKNOWN_AUTHORITY:
                return TLSFailure.UNKNOWN_AUTHORITY, detail
            if code == _EXPIRED:
                return TLSFailure.EXPIRED, detail
            if code == _NOT_YET_VALID:
                return TLSFailure.NOT_YET_VALID, detail
            if code in _WRONG_NAME:
                return TLSFailure.WRONG_NAME, detail
            return TLSFailure.OTHER_VERIFICATION, detail
        if isinstance(error, ssl.SSLError):
            reason = str(error.reason or "")
            if reason in _CLIENT_CERT_ALERTS:
                kind = TLSFailure.CLIENT_CERT_REFUSED if has_client_cert else TLSFailure.CLIENT_CERT_REQUIRED
                return kind, f"TLS alert {reason.lower()}"
            if reason in _NOT_TLS:
                return TLSFailure.NOT_TLS, reason.lower()
            return TLSFailure.HANDSHAKE, reason.lower() or str(error)
    return None


def explain_failure(exc: BaseException, config: UpstreamConfig) -> str | None:
    """One line for the log and the client's OCI error, e.g. `TLS: x509: certificate signed by unknown
    authority (...) [unable to get local issuer certificate]`; None when `exc` is no TLS problem."""
    found = classify_failure(exc, config.client_cert is not None)
    if found is None:
        return None
    kind, detail = found
    return f"TLS: {kind.value}" + (f" [{detail}]" if detail else "")
