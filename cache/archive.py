"""OCI image layout archives: a tar of `oci-layout`, `index.json` and `blobs/<alg>/<hex>`.

The writer streams into a new hidden file beside the output (created exclusively, so
nothing planted there is followed) and moves it into place at the end, so an interrupted
export never leaves a truncated archive under the requested name, and an existing file is
only replaced when asked. The reader verifies every digest and size it hands to the store:
an archive is only as trustworthy as its hashes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import posixpath
import secrets
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from cache import digests
from cache.manifests import MAX_LEVELS, Descriptor, InvalidIndex, index_entries, refs, valid_digest
from cache.mediatypes import OCI_INDEX, OCI_MANIFEST
from cache.storage import ContentStore, Manifest

REF_NAME = "org.opencontainers.image.ref.name"

_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
MAX_MANIFEST = 4 << 20
MAX_LAYOUT_FILE = 64 << 10  # oci-layout holds one short field
COPY_SIZE = 1 << 20


class ArchiveError(Exception):
    """The archive is not an OCI layout, or its content does not match its digests."""


class OutputExists(ArchiveError):
    """The output file exists and was not to be replaced."""


class Source(Protocol):
    def read(self, size: int, /) -> bytes:
        """Up to `size` bytes (at least one unless at the end); b"" at the end."""
        ...


def _blob_path(digest: str) -> str:
    algorithm, hex_ = digests.parse(digest)
    return f"blobs/{algorithm}/{hex_}"


class ArchiveWriter:
    """Blobs are added one at a time; `index.json` last, by `commit`. `tarfile` writes the tar."""

    def __init__(self, path: Path, replace: bool = False) -> None:
        self.path = path
        self._replace = replace
        if path.is_dir():
            raise ArchiveError(f"{path}: is a folder; name the archive file to write")
        if not replace and (path.exists() or path.is_symlink()):
            raise OutputExists(f"{path}: already exists")
        if not path.parent.is_dir():
            raise ArchiveError(f"{path}: folder {path.parent} does not exist")
        self._partial, fd = self._create()
        self._file = os.fdopen(fd, "wb")  # closed by commit or abort
        self._tar = tarfile.TarFile(  # what `tarfile.open` makes for "w"; `commit` closes it, `abort` drops it
            fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_SIZE
        )
        self._blobs: set[str] = set()
        self._folders: set[str] = set()
        self._index: list[dict[str, Any]] = []
        try:
            with self._io():
                self._add("oci-layout", _LAYOUT)
                self._folder("blobs")
        except BaseException:
            self.abort()
            raise

    def _create(self) -> tuple[Path, int]:
        try:
            return _new_file(self.path.parent, f".{self.path.name}")
        except OSError as exc:
            raise ArchiveError(f"{self.path}: cannot create a file in {self.path.parent}: {exc.strerror}") from None

    def has(self, digest: str) -> bool:
        return digest in self._blobs

    def add_bytes(self, digest: str, data: bytes) -> None:
        if digest not in self._blobs:
            self.add_blob(digest, len(data), io.BytesIO(data))

    def add_blob(self, digest: str, size: int, source: Source) -> None:
        """One blob of exactly `size` bytes, read from `source` (blocking: call it off the event loop)."""
        exact = _Exact(source, digest, size)
        with self._io():
            self._folder(os.path.dirname(_blob_path(digest)))
            self._tar.addfile(self._info(_blob_path(digest), size), exact)  # type: ignore[arg-type]  # read(n) only
        if exact.read(1):
            raise ArchiveError(f"blob {digest}: more than {size} bytes")
        self._blobs.add(digest)

    def add_image(self, manifest: Manifest, name: str) -> None:
        """An `index.json` entry: the image's top manifest under its full reference name."""
        entry = {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.body)}
        self._index.append({**entry, "annotations": {REF_NAME: name}})

    def commit(self) -> None:
        """Write `index.json`, sync, and move the file into place (never over one that appeared meanwhile)."""
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self._index}
        with self._io():
            self._add("index.json", json.dumps(index, indent=2).encode())
            self._tar.close()  # the end-of-archive blocks; leaves the file open
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self._replace:
                os.replace(self._partial, self.path)
            else:
                self._place()

    def _place(self) -> None:
        try:
            os.link(self._partial, self.path)  # fails if the output exists, unlike a rename
        except FileExistsError:
            raise OutputExists(f"{self.path}: already exists") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):  # no hard links here
                raise
            if self.path.exists() or self.path.is_symlink():
                raise OutputExists(f"{self.path}: already exists") from None
            os.rename(self._partial, self.path)
            return
        os.unlink(self._partial)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial)

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """A failed write names the output, not the hidden file beside it."""
        try:
            yield
        except OSError as exc:
            raise ArchiveError(f"{self.path}: {exc.strerror or exc}") from None

    def _add(self, name: str, data: bytes) -> None:
        self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def _folder(self, name: str) -> None:
        for folder in (os.path.dirname(name), name):
            if folder and folder not in self._folders:
                self._folders.add(folder)
                info = self._info(folder, 0)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                self._tar.addfile(info)

    @staticmethod
    def _info(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(time.time()), 0o644
        return info


class _Exact:
    """`source` as tarfile reads it: full reads of what it asks for, and no fewer than `size` bytes in all."""

    def __init__(self, source: Source, digest: str, size: int) -> None:
        self._source, self._digest, self._size, self._done = source, digest, size, 0

    def read(self, size: int) -> bytes:
        chunks: list[bytes] = []
        wanted = size
        while wanted > 0 and (chunk := self._source.read(wanted)):
            chunks.append(chunk)
            wanted -= len(chunk)
        data = b"".join(chunks)
        self._done += len(data)
        if wanted > 0 and self._done < self._size:
            raise ArchiveError(f"blob {self._digest}: {self._done} bytes, expected {self._size}")
        return data


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
        try:
            self._members = _members(self._tar)
            self._check_layout()
        except ArchiveError as exc:
            self._tar.close()
            raise ArchiveError(f"{path}: {exc}") from None

    def _check_layout(self) -> None:
        for name in ("oci-layout", "index.json"):
            if self._file(name, name) is None:
                raise ArchiveError(f"not an OCI image layout (no {name})")
        try:
            layout = json.loads(self._read("oci-layout", "oci-layout", MAX_LAYOUT_FILE))
        except ValueError:
            raise ArchiveError("oci-layout is not JSON") from None
        if not isinstance(layout, dict):
            raise ArchiveError("oci-layout is not a JSON object")
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str):
            raise ArchiveError("oci-layout names no imageLayoutVersion")
        if not version.startswith("1."):
            raise ArchiveError(f"unsupported OCI layout version {version!r}")

    def images(self) -> list[Descriptor]:
        """The entries of `index.json`, each with its ref name annotation if any."""
        try:
            entries = index_entries(self._read("index.json", "index.json", MAX_MANIFEST))
        except InvalidIndex as exc:
            raise ArchiveError(f"index.json is not an OCI image index: {exc}") from None
        if not entries:
            raise ArchiveError("index.json lists no images")
        return entries

    def plan(self, top: Descriptor) -> ImportPlan:
        """Read and verify every manifest under `top`, each once; raises `ArchiveError` for a missing or wrong one."""
        plan = ImportPlan(top)
        blobs: dict[str, Descriptor] = {}
        seen: set[str] = set()

        def walk(descriptor: Descriptor, level: int) -> None:
            digest = descriptor.digest
            if digest in seen:
                return
            seen.add(digest)
            if level > MAX_LEVELS:
                raise ArchiveError(f"manifest {digest} is nested more than {MAX_LEVELS} levels deep")
            member = self._file(_blob_path(digest), f"manifest {digest}")
            if member is None:
                if descriptor is top:
                    raise ArchiveError(f"the archive lacks manifest {digest}")
                plan.absent_children += 1
                return
            what = f"manifest {digest} in the archive"
            if descriptor.size is not None and member.size != descriptor.size:
                raise ArchiveError(f"{what}: size {member.size}, expected {descriptor.size}")
            body = self._read(member, f"manifest {digest}", MAX_MANIFEST)
            if not digests.matches(digest, body):
                raise ArchiveError(f"{what} does not match its digest")
            if not _is_object(body):
                raise ArchiveError(f"{what} is not a JSON object")
            found = refs(body)
            for child in found.manifests + found.blobs:
                if not valid_digest(child.digest):
                    raise ArchiveError(f"manifest {digest} names an invalid digest {child.digest!r}")
            for child in found.manifests:
                walk(child, level + 1)
            for blob in found.blobs:
                self._blob(blob, digest)
                blobs.setdefault(blob.digest, blob)
            plan.manifests.append(Manifest(digest, _media_type(descriptor, body), body))

        walk(top, 1)
        plan.blobs = list(blobs.values())
        return plan

    def _blob(self, descriptor: Descriptor, manifest: str | None = None) -> tarfile.TarInfo:
        """The member holding a blob, if it is a file of the size its descriptor says."""
        member = self._file(_blob_path(descriptor.digest), f"blob {descriptor.digest}")
        if member is None:
            of = f" of manifest {manifest}" if manifest else ""
            raise ArchiveError(f"the archive lacks blob {descriptor.digest}{of}")
        if descriptor.size is not None and member.size != descriptor.size:
            raise ArchiveError(
                f"blob {descriptor.digest} in the archive: size {member.size}, expected {descriptor.size}"
            )
        return member

    def copy_blob(self, descriptor: Descriptor, out: BinaryIO, advance: Callable[[int], None]) -> None:
        """A blob's bytes as the archive holds them, unverified (the caller verifies, e.g. on upload)."""
        source = self._tar.extractfile(self._blob(descriptor))
        assert source is not None
        with source:
            while chunk := source.read(COPY_SIZE):
                out.write(chunk)
                advance(len(chunk))

    def import_blob(self, store: ContentStore, descriptor: Descriptor, advance: Callable[[int], None]) -> bool:
        """Copy one blob into the store, verified; False if the store had it already."""
        if store.has_blob(descriptor.digest):
            advance(descriptor.size or 0)
            return False
        member = self._blob(descriptor)
        check = digests.Check(descriptor.digest)
        staged, fd = _new_file(store.partial_dir, f"import-{descriptor.digest.replace(':', '-')}")
        try:
            source = self._tar.extractfile(member)
            assert source is not None
            with source, os.fdopen(fd, "wb") as out:
                while chunk := source.read(COPY_SIZE):
                    out.write(chunk)
                    check.update(chunk)
                    advance(len(chunk))
            if not check.matches():
                raise ArchiveError(f"blob {descriptor.digest} in the archive hashes to {check.actual}")
            store.put_blob(descriptor.digest, staged)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        return True

    def _file(self, name: str, what: str) -> tarfile.TarInfo | None:
        """The member `name`, None if there is none; refused if it is a link or anything but a file."""
        member = self._members.get(name)
        if member is None or member.isfile():
            return member
        kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "folder or special file"
        raise ArchiveError(f"{what} in the archive is a {kind}, not a file")

    def _read(self, member: tarfile.TarInfo | str, what: str, limit: int) -> bytes:
        if isinstance(member, str):
            found = self._file(member, what)
            assert found is not None
            member = found
        if member.size > limit:
            raise ArchiveError(f"{what} in the archive is larger than {limit} bytes")
        source = self._tar.extractfile(member)
        assert source is not None
        with source:
            return source.read()

    def close(self) -> None:
        self._tar.close()


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Members by normalised name; an archive naming a path outside itself is refused, not half-read."""
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
            raise ArchiveError(f"member {member.name!r} leaves the layout (an absolute path or '..')")
        members[posixpath.normpath(member.name)] = member  # the last of a repeated name, as tar extracts it
    return members


def _new_file(folder: Path, name: str) -> tuple[Path, int]:
    """A new file `<folder>/<name>.<random>.partial`, created exclusively: nothing planted there is followed.

    Not `tempfile.mkstemp`, whose files are 0600 whatever the umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        path = folder / f"{name}.{secrets.token_hex(6)}.partial"
        try:
            return path, os.open(path, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder))


def _is_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _media_type(descriptor: Descriptor, body: bytes) -> str:
    if descriptor.media_type:
        return descriptor.media_type
    with contextlib.suppress(ValueError, AttributeError):
        declared = json.loads(body).get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
    return OCI_INDEX if refs(body).manifests else OCI_MANIFEST
