"""Serving TLS: the listener's certificate (checked, rotated, described) and client certificates.

uvicorn hands one `ssl.SSLContext` to the event loop for every connection. Loading a new
pair into that same context changes what *new* handshakes present and leaves established
connections alone, so rotation is a look at the files' identity every second; a changed
pair is read and checked on a scratch context first (a bad one keeps the old certificate,
and says why), then loaded into the live context on the event loop's thread, where
handshakes begin, so none ever sees half a pair. The pair is loaded from private copies of
the bytes that were checked, not from the paths again, which may have changed in between.

Client certificates: `PeerCertificate` is a mixin for uvicorn's HTTP protocol classes that
puts the ASGI TLS extension (`scope["extensions"]["tls"]`) into each request of a
connection; `client_identity` turns its verified subject into a user name and groups.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from anyio import to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import Denied
from proxy.http.edge import error_response
from proxy.ops import metrics
from proxy.tls.files import CertificateInfo, Pair, Staged, TLSFileError, load_chain, read_pair, server_context

if TYPE_CHECKING:
    from proxy.config import Config

log = structlog.get_logger("pullproxy")

ROTATION_INTERVAL = 1.0  # seconds between looks at the certificate files
EXPIRY_WARNING_DAYS = 14
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


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
        self.context = server_context(client_ca, refused_in_http)
        ids = self._ids()
        pair = read_pair(cert, key)
        load_chain(self.context, pair)
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

    def _stage(self) -> tuple[Pair, Staged]:
        """Blocking: read the pair, stage it, and load it into a scratch context, which is what could fail."""
        pair = read_pair(self.cert_path, self.key_path)
        staged = Staged(pair)
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
    protocol = getattr(protocol, "protocol", protocol)  # `http.server.Protocols` makes its protocol's connections
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
    return {"ssl_context_factory": factory}  # `http.server.serve_options` gives the protocol `PeerCertificate`


# -- client certificates ---------------------------------------------------------------


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, object]:
    """The ASGI TLS extension of one connection (https://asgi.readthedocs.io/en/latest/specs/tls.html)."""
    chain: list[str] = []
    name = None
    # A client sends a certificate only when asked, and it is asked only when it must be verified.
    der = ssl_object.getpeercert(binary_form=True) if ssl_object.context.verify_mode != ssl.CERT_NONE else None
    if der:
        from cryptography import x509  # here: a mirror without client certificates never loads it (see `files`)
        from cryptography.hazmat.primitives import serialization

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
    refusal = error_response(
        Denied("this mirror requires a TLS client certificate signed by its client CA (server.tls_client_ca)")
    )

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
    from cryptography import x509
    from cryptography.x509.oid import NameOID

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
