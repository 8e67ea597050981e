"""Upstream TLS: whom pullproxy trusts (the operating system's store, an upstream's `ca_file`),
its client certificate, and failures described as Go clients do (`x509: ...`)."""

from __future__ import annotations

import enum
import ssl
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
import truststore

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig

log = structlog.get_logger("pullproxy")


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
