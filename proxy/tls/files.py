"""TLS files: certificates, keys and CAs read, checked and loaded, each failure naming its file's role.

The configuration checks them before start-up (a bad pair stops it with one line naming the
key), and rotation checks a new pair the same way before the listener uses it.
"""

from __future__ import annotations

import enum
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography (about 10 MiB of memory once loaded) is imported where a PEM file is read, so a
# mirror that has no TLS files configured never loads it.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


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
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

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
    from cryptography import x509

    data = _read(path, role)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSFileError(role, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certificates


def _read_key(path: Path) -> tuple[bytes, PrivateKeyTypes]:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(path, Role.KEY)
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSFileError(Role.KEY, f"{path} is encrypted; give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSFileError(Role.KEY, f"{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)") from None


def _public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

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
    from cryptography.hazmat.primitives import serialization

    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return Pair(pem, key_pem, CertificateInfo.of(chain[0]))


class Staged:
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


def load_chain(context: ssl.SSLContext, pair: Pair) -> None:
    staged = Staged(pair)
    try:
        staged.load_into(context)
    finally:
        staged.remove()


def server_context(client_ca: Path | None, refused_in_http: bool = False) -> ssl.SSLContext:
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
    load_chain(server_context(client_ca), read_pair(cert, key))


def check_upstream_files(ca_file: Path | None, client_cert: Path | None, client_key: Path | None) -> None:
    """What `upstream_context` would refuse, as a TLSFileError (for the configuration check)."""
    if ca_file is not None:
        read_certificates(ca_file, Role.CA)
    if client_cert is not None and client_key is not None:
        load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), read_pair(client_cert, client_key))
