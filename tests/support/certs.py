"""Test certificates, made by each test with trustme and written to its temp folder (never checked in)."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class KeyPair:
    cert: Path  # PEM chain, leaf first
    key: Path

    def write_as(self, folder: Path, stem: str) -> None:
        """Copy as `<stem>.cert` / `<stem>.key`, the names containers' --cert-dir looks for."""
        (folder / f"{stem}.cert").write_bytes(self.cert.read_bytes())
        (folder / f"{stem}.key").write_bytes(self.key.read_bytes())


class PKI:
    """A private CA whose certificate and issued pairs live as PEM files under `folder`."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.ca = trustme.CA(organization_name=f"pullproxy tests {name}")
        self.ca_cert = folder / f"{name}.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_cert))
        self._count = 0

    def _write(self, leaf: trustme.LeafCert, stem: str | None) -> KeyPair:
        self._count += 1
        stem = stem or f"{self.name}-leaf{self._count}"
        cert, key = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return KeyPair(cert, key)

    def server(self, *hosts: str, stem: str | None = None, not_after: datetime.datetime | None = None) -> KeyPair:
        """A server certificate for `hosts` (default: 127.0.0.1 and localhost)."""
        leaf = self.ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")), not_after=not_after)
        return self._write(leaf, stem)

    def client(self, common_name: str, organization: str | None = None, stem: str | None = None) -> KeyPair:
        """A client certificate with subject CN=<common_name>,O=<organization> (trustme's name by default)."""
        name = f"{common_name}.clients.test"
        leaf = self.ca.issue_cert(name, common_name=common_name, organization_name=organization)
        return self._write(leaf, stem)

    def context(self, client: KeyPair | None = None) -> ssl.SSLContext:
        """A client context trusting only this CA (for httpx `verify=`), with a client pair if given."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if client is not None:
            context.load_cert_chain(str(client.cert), str(client.key))
        return context

    def cert_dir(self, folder: Path, client: KeyPair | None = None) -> Path:
        """A containers-style certificate folder: `ca.crt`, and `client.cert`/`client.key` for a pair."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.crt").write_bytes(self.ca_cert.read_bytes())
        if client is not None:
            client.write_as(folder, "client")
        return folder
