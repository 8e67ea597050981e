"""`HostedRepositories`: what clients push, kept in a content store of its own and a `HostedIndex`.

`proxy.hosted.opening.open_hosted` builds both from the configuration: on one host a
`DiskContentStore` and the SQLite `Index`; in a fleet (`[coordination]`) the `RedisIndex`, and
with `[storage] backend = "s3"` a bucket store under `hosted/` that never evicts. Uploads are
staged in this host's `uploads/` either way; in a fleet each upload's record names the replica
that stages it (`replica_url`), so the others forward its requests there.

On one host the blobs live in a `DiskContentStore` of their own (`<cache dir>/hosted/content`) whose size
limit is never reached, so nothing hosted is ever evicted: the cache's store could pin them,
but its pins are replaced wholesale by `[[pin]]` refreshes and count against `[cache]
max_size`, while hosted content has its own limit (`[hosted] max_size`). Manifests, tags and
links are rows of the `Index`. Every method blocks (disk, SQLite, hashing): call it in a thread.

A blob pushed while the cache holds it is stored once: the hosted store takes a hard link to
the cache's verified file instead of the uploaded copy, so the bytes survive the cache's eviction.
The other way round, the mirror's `Blobs` links the hosted file into the cache instead of
downloading it, once the upstream repository is known to hold the digest.

A blob becomes visible only after it was uploaded whole, its digest verified, flushed and
renamed into the store and linked in one transaction; a crash before the link leaves a file
nothing names, which `gc` removes.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cache import digests, inventory
from cache import manifests as walker
from cache.mediatypes import OCI_INDEX
from cache.storage import BlobFile, ContentStore
from cache.store import DiskContentStore, hard_link
from proxy import errors, references
from proxy.config import Hosted
from proxy.hosted.index import HostedIndex, Index, StoredManifest
from proxy.hosted.names import HostedNames

MAX_MANIFEST = 4 << 20
_UNBOUNDED = 1 << 62  # the content store's limit: hosted content is bounded by the quota, never evicted
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch
_HASH_READ = 1 << 20
NEEDED_SLACK = 60.0  # a blob's link is refreshed at most this often; gc waits this much longer


class Quota(StrEnum):
    REPOSITORIES = "max_repositories"
    SIZE = "max_size"
    MANIFESTS = "max_manifests_per_repository"


def quota_exceeded(quota: Quota, limit: int, use: int) -> errors.Denied:
    return errors.Denied(
        f"[hosted] {quota} exceeded: the limit is {limit}, {use} in use",
        {"quota": str(quota), "limit": limit, "use": use},
    )


@dataclass(frozen=True, slots=True)
class Pushed:
    digest: str
    subject: str | None


@dataclass(frozen=True, slots=True)
class Collected:
    """What a garbage collection removed (or, dry, would remove)."""

    unlinked: int  # links of blobs no manifest of their repository names, older than `upload_ttl`
    blobs: int  # blobs no repository links
    bytes: int
    uploads: int  # abandoned uploads


@dataclass(frozen=True, slots=True)
class RepositoryUse:
    name: str
    bytes: int  # its blobs and manifests (a blob several repositories link counts in each)
    tags: int
    manifests: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What hosted content holds, for metrics, the status page and `cache ls`."""

    bytes: int  # as `max_size` counts it: distinct blobs, manifests, uploads in progress
    repositories: tuple[RepositoryUse, ...]

    @property
    def manifests(self) -> int:
        return sum(repo.manifests for repo in self.repositories)

    def quota_use(self) -> dict[Quota, int]:
        """Each quota's use; a per-repository one's is its fullest repository's."""
        return {
            Quota.SIZE: self.bytes,
            Quota.REPOSITORIES: len(self.repositories),
            Quota.MANIFESTS: max((repo.manifests for repo in self.repositories), default=0),
        }


@dataclass(frozen=True, slots=True)
class TaggedImage:
    repo: str
    tag: str
    digest: str
    size: int  # the manifest and what it names (an index: its children and theirs), as far as stored
    platforms: int  # an index's entries; 0 for an image


@dataclass(frozen=True, slots=True)
class Damaged:
    """Hosted content whose bytes do not match its digest, or whose file is gone (`verify`)."""

    digest: str
    repositories: tuple[str, ...]  # that link the blob, or hold the manifest
    manifest: bool


def upload_unknown(upload: str) -> errors.BlobUploadUnknown:
    return errors.BlobUploadUnknown(f"blob upload {upload[:64]!r} is unknown (finished, cancelled or expired)")


class HostedRepositories:
    """`cached`: the cache's file of a digest, if it holds one (`ContentStore.find_blob`), to store a blob once.

    `content` and `index` default to one host's (a `DiskContentStore` and the SQLite `Index` in
    `directory`); given, they are this object's to close. `replica_url`: this replica's URL in a
    fleet, recorded on the uploads it stages; None on one host.
    """

    def __init__(
        self,
        config: Hosted,
        directory: Path,
        cached: Callable[[str], BlobFile | None] | None = None,
        *,
        content: ContentStore | None = None,
        index: HostedIndex | None = None,
        replica_url: str | None = None,
    ) -> None:
        self.config = config
        self._cached = cached
        self.replica_url = replica_url
        self.names = HostedNames(config.repositories)
        directory.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = directory / "uploads"
        self.uploads_dir.mkdir(exist_ok=True)
        self.content: ContentStore = DiskContentStore(directory, _UNBOUNDED) if content is None else content
        try:
            self.index: HostedIndex = Index(directory / "index.sqlite") if index is None else index
        except BaseException:
            self.content.close()
            raise

    def close(self) -> None:
        self.index.close()
        self.content.close()

    # -- quotas ------------------------------------------------------------------------

    def in_use(self) -> int:
        """Bytes of hosted blobs, manifests and uploads in progress (not the index's own pages)."""
        uploading = self.index.upload_volume()  # a fleet's, recorded as they grow
        if uploading is None:  # this host's, as staged
            uploading = 0
            for entry in os.scandir(self.uploads_dir):
                try:
                    uploading += entry.stat().st_size
                except OSError:
                    continue
        return self.index.blob_volume() + self.index.manifest_volume() + uploading

    def usage(self) -> Usage:
        repos = tuple(RepositoryUse(*row) for row in self.index.repository_sizes())
        return Usage(self.in_use(), repos)

    def quota_limits(self) -> dict[Quota, int]:
        return {quota: int(getattr(self.config, quota)) for quota in Quota}

    def check_room(self, more: int, in_use: int | None = None) -> None:
        use = self.in_use() if in_use is None else in_use
        if use + more > self.config.max_size:
            raise quota_exceeded(Quota.SIZE, self.config.max_size, use)

    def check_repository(self, repo: str) -> None:
        if self.index.has_repository(repo):
            return
        count = self.index.repository_count()
        if count >= self.config.max_repositories:
            raise quota_exceeded(Quota.REPOSITORIES, self.config.max_repositories, count)

    # -- uploads -----------------------------------------------------------------------

    def start_upload(self, repo: str) -> str:
        self.sweep_uploads()
        self.check_repository(repo)
        upload = uuid.uuid4().hex
        (self.uploads_dir / upload).touch()
        self.index.add_upload(upload, repo, self.replica_url)
        return upload

    def upload_owner(self, upload: str) -> str | None:
        """The URL of the replica staging `upload` if that is another one; None if it is this one or unknown."""
        if not _UPLOAD_ID.fullmatch(upload):
            return None
        owner = self.index.upload_owner(upload)
        return None if owner is None or owner == self.replica_url else owner

    def grew(self, upload: str, size: int) -> None:
        """The upload holds `size` bytes now (counted against `max_size` fleet-wide)."""
        self.index.set_upload_size(upload, size)

    def upload_path(self, repo: str, upload: str) -> Path:
        """The file of an upload to `repo` in progress; BLOB_UPLOAD_UNKNOWN otherwise."""
        if not _UPLOAD_ID.fullmatch(upload) or self.index.upload_repository(upload) != repo:
            raise upload_unknown(upload)
        path = self.uploads_dir / upload
        if not path.exists():
            raise upload_unknown(upload)
        return path

    def cancel_upload(self, repo: str, upload: str) -> None:
        path = self.upload_path(repo, upload)
        self._drop_upload(upload, path)

    def _drop_upload(self, upload: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.index.remove_upload(upload)

    def complete_upload(self, repo: str, upload: str, digest: str) -> int:
        """Verify the upload's bytes against `digest` and store and link them; DIGEST_INVALID keeps nothing."""
        path = self.upload_path(repo, upload)
        try:
            check = digests.Check(digest)
        except digests.InvalidDigest:
            self._drop_upload(upload, path)
            raise errors.digest_invalid(digest) from None
        size = 0
        with open(path, "rb") as staged:
            while chunk := staged.read(_HASH_READ):
                check.update(chunk)
                size += len(chunk)
        if not check.matches():
            self._drop_upload(upload, path)
            raise errors.DigestInvalid(
                f"the uploaded bytes have digest {check.actual}, not {digest}", {"digest": digest}
            )
        try:
            self.check_repository(repo)
        except errors.Denied:
            self._drop_upload(upload, path)
            raise
        # Stored outside the write lock (an object store upload may take a while, and the lock is the
        # fleet's), held meanwhile: gc keeps a held digest, and lists what is stored before the holds.
        self.index.hold_blob(upload, digest)
        if not self.content.has_blob(digest):
            self.content.put_blob(digest, self._shared(digest, size, path), size)
        with self.index.write():  # no garbage collection between checking and linking
            try:
                self.check_repository(repo)  # again: another upload may have made the last repository meanwhile
            except errors.Denied:
                self._drop_upload(upload, path)
                raise
            if not self.content.has_blob(digest):  # a gc that had not seen the hold removed the copy found
                if not path.exists():
                    self._drop_upload(upload, path)
                    raise errors.unavailable(f"blob {digest} was removed while it was stored: push it again")
                self.content.put_blob(digest, self._shared(digest, size, path), size)
            self.index.link_blob(repo, digest, size)
            self.index.remove_upload(upload)
        path.unlink(missing_ok=True)  # stored once
        return size

    def _shared(self, digest: str, size: int, uploaded: Path) -> Path:
        """A hard link to the cache's file of `digest` in place of `uploaded` (removed), else `uploaded`.

        Only when the hosted content is on this disk: in a bucket the two are separate objects
        anyway, and asking the cache might fetch its object just to link it.
        """
        local = isinstance(self.content, DiskContentStore)
        found = self._cached(digest) if self._cached is not None and local else None
        if found is None or found.size != size:
            return uploaded
        link = uploaded.with_name(uploaded.name + ".cached")
        if not hard_link(found, link):
            return uploaded
        uploaded.unlink()
        return link

    def sweep_uploads(self, dry_run: bool = False) -> int:
        """Drop uploads idle for longer than `upload_ttl` (and files a crash left without a record); how many.

        An upload's last activity is its file's last write (each `PATCH` or `PUT` touches it),
        so a long chunked push is kept as long as chunks keep coming.
        """
        cutoff = time.time() - self.config.upload_ttl
        dropped = 0
        known = set()
        for upload, started in self.index.uploads():
            known.add(upload)
            if started < cutoff and self._last_written(upload) < cutoff:
                if not dry_run:
                    self._drop_upload(upload, self.uploads_dir / upload)
                dropped += 1
        for entry in os.scandir(self.uploads_dir):
            try:
                # ctime: a hard link just made to an old cached file has an old mtime but a new ctime
                if entry.name not in known and entry.stat().st_ctime < cutoff:
                    if not dry_run:
                        os.unlink(entry.path)
                    dropped += 1
            except OSError:
                continue
        return dropped

    def _last_written(self, upload: str) -> float:
        try:
            return os.stat(self.uploads_dir / upload).st_mtime
        except OSError:
            return 0.0

    # -- blobs -------------------------------------------------------------------------

    def mount(self, repo: str, source: str, digest: str) -> int | None:
        """Link `source`'s blob into `repo`; None if `source` does not hold it."""
        with self.index.write():
            size = self.index.blob_size(source, digest)
            if size is None or not self.content.has_blob(digest):
                return None
            self.check_repository(repo)
            self.index.link_blob(repo, digest, size)
            return size

    def adopt(self, repo: str, digest: str) -> int | None:
        """Link the cache's verified blob into `repo` (a mount from a cached repository); None if not cached."""
        with self.index.write():
            if not self.content.has_blob(digest):
                found = self._cached(digest) if self._cached is not None else None
                if found is None:
                    return None
                self.check_repository(repo)
                self.check_room(found.size)
                link = self.uploads_dir / f"{uuid.uuid4().hex}.cached"
                if not hard_link(found, link):
                    return None
                self.content.put_blob(digest, link, found.size)
            stored = self.content.find_blob(digest)
            if stored is None:
                return None
            self.check_repository(repo)
            self.index.link_blob(repo, digest, stored.size)
            return stored.size

    def blob_size(self, repo: str, digest: str) -> int | None:
        return self.index.blob_size(repo, digest)

    def blob_file(self, repo: str, digest: str) -> BlobFile | None:
        """The blob `repo` holds, kept by gc for `upload_ttl` more: a client that found it may name it next."""
        if self.index.needed_blob(repo, digest, time.time() - NEEDED_SLACK) is None:
            return None
        return self.content.find_blob(digest)

    def delete_blob(self, repo: str, digest: str) -> bool:
        return self.index.unlink_blob(repo, digest)

    # -- manifests ---------------------------------------------------------------------

    def put_manifest(self, repo: str, reference: str, content_type: str | None, body: bytes) -> Pushed:
        if len(body) > MAX_MANIFEST:
            raise errors.TooLarge(f"a manifest may be at most {MAX_MANIFEST} bytes")
        tag = None if digests.is_digest(reference) else reference
        if tag is not None and not references.valid_tag(tag):
            raise errors.ManifestInvalid(f"{tag[:200]!r} is not a valid tag", {"tag": tag[:200]})
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise errors.ManifestInvalid("the manifest is not a JSON object")
        media_type = (content_type or "").split(";")[0].strip() or parsed.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise errors.ManifestInvalid("the manifest's media type is unknown: send it as Content-Type")
        if tag is None:
            try:
                digests.parse(reference)
            except digests.InvalidDigest:
                raise errors.digest_invalid(reference) from None
            if not digests.matches(reference, body):
                raise errors.DigestInvalid(f"the manifest's digest is not {reference}", {"digest": reference})
            digest = reference
        else:
            digest = digests.of(body)
        subject = _subject(parsed)
        refs = walker.refs(body)
        stored = StoredManifest(digest, media_type, body, _artifact_type(parsed))
        with self.index.write():
            for blob in refs.blobs:
                if self.index.blob_size(repo, blob.digest) is None:
                    raise _blob_unknown(blob.digest)
            for child in refs.manifests:
                if not self.index.has_manifest(repo, child.digest):
                    raise _blob_unknown(child.digest)
            if not self.index.has_manifest(repo, digest):
                self.check_repository(repo)
                count = self.index.manifest_count(repo)
                if count >= self.config.max_manifests_per_repository:
                    raise quota_exceeded(Quota.MANIFESTS, self.config.max_manifests_per_repository, count)
                self.check_room(len(body))
            named = [d.digest for d in refs.blobs] + [d.digest for d in refs.manifests]
            self.index.put_manifest(repo, stored, subject, named, tag)
        return Pushed(digest, subject)

    def manifest(self, repo: str, reference: str) -> StoredManifest | None:
        return self.index.manifest(repo, reference)

    def delete_manifest(self, repo: str, reference: str) -> bool:
        """By digest: the manifest and its tags; by tag: the tag only."""
        if digests.is_digest(reference):
            return self.index.delete_manifest(repo, reference)
        return self.index.delete_tag(repo, reference)

    def tags(self, repo: str) -> list[str] | None:
        """None: no such hosted repository."""
        if not self.index.has_repository(repo):
            return None
        return self.index.tags(repo)

    def referrers(self, repo: str, digest: str) -> bytes:
        entries = []
        for found in self.index.referrers(repo, digest):
            entry: dict[str, Any] = {"mediaType": found.media_type, "digest": found.digest, "size": len(found.body)}
            if found.artifact_type:
                entry["artifactType"] = found.artifact_type
            annotations = json.loads(found.body).get("annotations")
            if isinstance(annotations, dict) and annotations:
                entry["annotations"] = annotations
            entries.append(entry)
        return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()

    def repositories(self) -> list[str]:
        return self.index.repositories()

    def images(self) -> list[TaggedImage]:
        """Every tag, with the size of what it names, for `pullproxy cache ls`."""
        found = []
        for repo, tag, digest in self.index.tagged():
            top = self.index.manifest(repo, digest)
            if top is None:
                continue
            children = walker.refs(top.body).manifests
            size = len(top.body) + self._blobs_size(top.body)
            for child in children:
                stored = self.index.manifest(repo, child.digest)
                if stored is not None:
                    size += len(stored.body) + self._blobs_size(stored.body)
            found.append(TaggedImage(repo, tag, digest, size, len(children)))
        return found

    @staticmethod
    def _blobs_size(body: bytes) -> int:
        return sum(blob.size or 0 for blob in walker.refs(body).blobs)

    # -- verification ------------------------------------------------------------------

    def verify(self, advance: Callable[[int], None]) -> list[Damaged]:
        """Re-hash every hosted blob and manifest and report what does not match or is gone.

        Nothing is removed, unlike the cache's `verify`: a push was acknowledged, there is no
        upstream to fetch it from again, and which repository must do without is the operator's call.
        """
        damaged = []
        stored = {entry.digest for entry in self.content.entries() if not entry.is_manifest}
        for digest in sorted(stored | self.index.linked_digests()):
            path = self.content.stored_path(digest)
            if path is None or not inventory.file_matches(digest, path, advance):
                damaged.append(Damaged(digest, tuple(self.index.linking(digest)), manifest=False))
        bad_manifests: dict[str, list[str]] = {}
        for repo, digest, body in self.index.manifest_bodies():
            try:
                ok = digests.matches(digest, body)
            except digests.InvalidDigest:
                ok = False
            if not ok:
                bad_manifests.setdefault(digest, []).append(repo)
        damaged.extend(Damaged(digest, tuple(repos), manifest=True) for digest, repos in bad_manifests.items())
        return damaged

    # -- garbage collection ------------------------------------------------------------

    def collect(self, dry_run: bool = False) -> Collected:
        """Drop abandoned uploads, links no manifest needs (older than `upload_ttl`), and unlinked blobs.

        Online and safe: it holds the index's write lock, so no upload is linked and no
        manifest checked against its blobs meanwhile; a blob an upload is storing (held) stays.
        """
        uploads = self.sweep_uploads(dry_run)
        with self.index.write():
            # NEEDED_SLACK more: a link found fresh is not refreshed, and must last `upload_ttl` still
            stale = self.index.unreferenced_links(time.time() - self.config.upload_ttl - NEEDED_SLACK)
            if not dry_run:
                for repo, digest in stale:
                    self.index.unlink_blob(repo, digest)
            entries = self.content.entries()  # before the holds: a blob stored after this is not listed
            if not dry_run:
                linked = self.index.linked_digests()
            else:
                still = {(r, d) for r, d in stale}
                linked = {d for r, d in self._all_links() if (r, d) not in still}
            linked |= self.index.held_digests()  # uploads storing them outside the lock
            removed = freed = 0
            for entry in entries:
                if entry.is_manifest or entry.digest in linked:
                    continue
                if dry_run or self.content.remove(entry.key):
                    removed += 1
                    freed += entry.size
        return Collected(len(stale), removed, freed, uploads)

    def _all_links(self) -> list[tuple[str, str]]:
        return self.index.unreferenced_links(float("inf")) + self.index.referenced_links()


def _blob_unknown(digest: str) -> errors.ManifestBlobUnknown:
    return errors.ManifestBlobUnknown(f"blob {digest} is not in the repository", {"digest": digest})


def _subject(parsed: dict[str, Any]) -> str | None:
    subject = parsed.get("subject")
    if isinstance(subject, dict) and isinstance(subject.get("digest"), str) and walker.valid_digest(subject["digest"]):
        return str(subject["digest"])
    return None


def _artifact_type(parsed: dict[str, Any]) -> str | None:
    value = parsed.get("artifactType")
    if isinstance(value, str) and value:
        return value
    config = parsed.get("config")
    if isinstance(config, dict) and isinstance(config.get("mediaType"), str):
        return str(config["mediaType"])
    return None
