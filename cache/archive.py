"""OCI image layout archives: a tar of `oci-layout`, `index.json` and `blobs/<alg>/<hex>`.

The writer streams into `<file>.partial` and renames it at the end, so an interrupted
export never leaves a truncated archive under the requested name. The reader verifies
every digest it hands to the store: an archive is only as trustworthy as its hashes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache import digests
from cache.manifests import Descriptor, refs
from cache.store import ContentStore, Manifest

REF_NAME = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_BLOCK = tarfile.BLOCKSIZE
MAX_MANIFEST = 4 << 20
COPY_SIZE = 1 << 20


class ArchiveError(Exception):
    """The archive is not an OCI layout, or its content does not match its digests."""


def _blob_path(digest: str) -> str:
    algorithm, hex_ = digests.parse(digest)
    return f"blobs/{algorithm}/{hex_}"


class ArchiveWriter:
    """Blobs are written one at a time (`begin`, `write`..., `end`); `index.json` last."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._out = open(self._partial, "wb")  # noqa: SIM115 -- closed by commit or abort
        self._blobs: set[str] = set()
        self._index: list[dict[str, Any]] = []
        self._pending: tuple[str, int] | None = None
        self._written = 0
        self._member("oci-layout", _LAYOUT)
        for folder in ("blobs/", "blobs/sha256/"):
            self._header(folder, 0, tarfile.DIRTYPE)

    def has(self, digest: str) -> bool:
        return digest in self._blobs

    def add_bytes(self, digest: str, data: bytes) -> None:
        if digest not in self._blobs:
            self.begin(digest, len(data))
            self.write(data)
            self.end()

    def begin(self, digest: str, size: int) -> None:
        self._header(_blob_path(digest), size, tarfile.REGTYPE)
        self._pending, self._written = (digest, size), 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def end(self) -> None:
        assert self._pending is not None
        digest, size = self._pending
        if self._written != size:
            raise ArchiveError(f"{digest}: wrote {self._written} bytes, expected {size}")
        self._pad(size)
        self._blobs.add(digest)
        self._pending = None

    def add_image(self, manifest: Manifest, name: str) -> None:
        """An `index.json` entry: the image's top manifest under its full reference name."""
        entry = {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.body)}
        self._index.append({**entry, "annotations": {REF_NAME: name}})

    def commit(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self._index}
        self._member("index.json", json.dumps(index, indent=2).encode())
        self._out.write(b"\0" * (2 * _BLOCK))
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._out.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial)

    def _member(self, name: str, data: bytes) -> None:
        self._header(name, len(data), tarfile.REGTYPE)
        self._out.write(data)
        self._pad(len(data))

    def _header(self, name: str, size: int, kind: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mtime = size, kind, int(time.time())
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        self._out.write(info.tobuf(tarfile.PAX_FORMAT))

    def _pad(self, size: int) -> None:
        self._out.write(b"\0" * (-size % _BLOCK))


@dataclass
class ImportPlan:
    """One image of an archive: manifests (children before parents) and the blobs they need."""

    top: Descriptor
    manifests: list[Manifest] = field(default_factory=list)
    blobs: list[Descriptor] = field(default_factory=list)
    absent_children: int = 0  # platforms an exported index lists but the archive does not hold

    @property
    def size(self) -> int:
        return sum(b.size or 0 for b in self.blobs)


class ArchiveReader:
    def __init__(self, path: Path) -> None:
        try:
            self._tar = tarfile.open(path)  # noqa: SIM115 -- closed by close()
        except (OSError, tarfile.TarError) as exc:
            raise ArchiveError(f"{path}: not a readable tar archive ({exc})") from None
        self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
        if "oci-layout" not in self._members or "index.json" not in self._members:
            raise ArchiveError(f"{path}: not an OCI image layout (no oci-layout or index.json)")
        try:
            version = json.loads(self._read("oci-layout")).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if not str(version).startswith("1."):
            raise ArchiveError(f"{path}: unsupported OCI layout version {version!r}")

    def images(self) -> list[Descriptor]:
        """The entries of `index.json`, each with its ref name annotation if any."""
        return refs(self._read("index.json")).manifests

    def plan(self, top: Descriptor) -> ImportPlan:
        """Read and verify every manifest under `top`; raises `ArchiveError` for a missing or wrong one."""
        plan = ImportPlan(top)
        blobs: dict[str, Descriptor] = {}

        def walk(descriptor: Descriptor, required: bool) -> None:
            if not self.holds(descriptor.digest):
                if required:
                    raise ArchiveError(f"the archive lacks manifest {descriptor.digest}")
                plan.absent_children += 1
                return
            body = self._read(_blob_path(descriptor.digest), MAX_MANIFEST)
            if not digests.matches(descriptor.digest, body):
                raise ArchiveError(f"manifest {descriptor.digest} in the archive does not match its digest")
            found = refs(body)
            for child in found.manifests:
                walk(child, required=False)
            for blob in found.blobs:
                if not self.holds(blob.digest):
                    raise ArchiveError(f"the archive lacks blob {blob.digest} of manifest {descriptor.digest}")
                blobs.setdefault(blob.digest, blob)
            plan.manifests.append(Manifest(descriptor.digest, _media_type(descriptor, body), body))

        walk(top, required=True)
        plan.blobs = list(blobs.values())
        return plan

    def holds(self, digest: str) -> bool:
        try:
            return _blob_path(digest) in self._members
        except digests.InvalidDigest:
            return False

    def import_blob(self, store: ContentStore, descriptor: Descriptor, advance: Callable[[int], None]) -> bool:
        """Copy one blob into the store, verified; False if the store had it already."""
        if store.has_blob(descriptor.digest):
            advance(descriptor.size or 0)
            return False
        member = self._members[_blob_path(descriptor.digest)]
        staged = store.partial_dir / f"import-{os.getpid()}-{descriptor.digest.replace(':', '-')}"
        hasher = digests.hasher(descriptor.digest)
        try:
            source = self._tar.extractfile(member)
            assert source is not None
            with source, open(staged, "wb") as out:
                while chunk := source.read(COPY_SIZE):
                    out.write(chunk)
                    hasher.update(chunk)
                    advance(len(chunk))
            actual = f"{digests.parse(descriptor.digest)[0]}:{hasher.hexdigest()}"
            if actual != descriptor.digest or (descriptor.size is not None and member.size != descriptor.size):
                raise ArchiveError(f"blob {descriptor.digest} in the archive hashes to {actual} ({member.size} bytes)")
            store.put_blob(descriptor.digest, staged)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        return True

    def _read(self, name: str, limit: int = MAX_MANIFEST) -> bytes:
        member = self._members[name]
        if member.size > limit:
            raise ArchiveError(f"{name} in the archive is larger than {limit} bytes")
        source = self._tar.extractfile(member)
        assert source is not None
        with source:
            return source.read()

    def close(self) -> None:
        self._tar.close()


def _media_type(descriptor: Descriptor, body: bytes) -> str:
    if descriptor.media_type:
        return descriptor.media_type
    with contextlib.suppress(ValueError, AttributeError):
        declared = json.loads(body).get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
    return OCI_INDEX if refs(body).manifests else OCI_MANIFEST
