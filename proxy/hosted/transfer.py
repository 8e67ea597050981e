"""Hosted images into and out of OCI layout archives, for `pullproxy export` and `import`.

An export walks a tag's manifests and blobs in the repository (no upstream: hosted content
is only here). An import pushes as a client would: every blob through an upload (verified on
completion, against `[hosted] max_size`), then the manifests children first, so each is
checked against what the repository holds and counted against the quotas. Blocking: call
these in a thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from cache import manifests as walker
from cache.archive import ArchiveReader, ArchiveWriter
from cache.manifests import Descriptor
from cache.storage import Manifest
from proxy import errors
from proxy.hosted.repository import HostedRepositories


@dataclass(frozen=True, slots=True)
class Moved:
    manifests: int
    blobs: int
    added: int  # blobs the target lacked
    size: int  # bytes of the blobs


def export_image(hosted: HostedRepositories, archive: ArchiveWriter, repo: str, reference: str, name: str) -> Moved:
    """Write `repo`'s image `reference` (tag or digest) with all its platforms; MANIFEST_UNKNOWN if absent."""
    top = hosted.manifest(repo, reference)
    if top is None:
        raise errors.manifest_unknown(repo, reference)
    stored: dict[str, Manifest] = {}
    blobs: dict[str, int] = {}

    def walk(digest: str, level: int) -> None:
        if digest in stored or level > walker.MAX_LEVELS:
            return
        found = hosted.manifest(repo, digest)
        if found is None:
            raise errors.manifest_unknown(repo, digest)
        stored[digest] = Manifest(found.digest, found.media_type, found.body)
        named = walker.refs(found.body)
        for child in named.manifests:
            walk(child.digest, level + 1)
        for blob in named.blobs:
            blobs.setdefault(blob.digest, blob.size or 0)

    walk(top.digest, 1)
    for manifest in stored.values():
        archive.add_bytes(manifest.digest, manifest.body)
    added = size = 0
    for digest in blobs:
        found = hosted.blob_file(repo, digest)
        if found is None:
            raise errors.blob_unknown(digest)
        size += found.size
        if archive.has(digest):
            continue
        with open(found.path, "rb") as source:
            archive.add_blob(digest, found.size, source)
        added += 1
    archive.add_image(stored[top.digest], name)
    return Moved(len(stored), len(blobs), added, size)


def import_image(
    hosted: HostedRepositories,
    reader: ArchiveReader,
    entry: Descriptor,
    repo: str,
    tag: str | None,
    advance: Callable[[int], None],
) -> Moved:
    """Push the archive's image `entry` into `repo`, tagged `tag`; a quota or a missing child raises."""
    plan = reader.plan(entry)
    added = 0
    for blob in plan.blobs:
        if hosted.blob_file(repo, blob.digest) is not None:
            advance(blob.size or 0)
            continue
        upload = hosted.start_upload(repo)
        try:
            hosted.check_room(blob.size or 0)
            with open(hosted.upload_path(repo, upload), "wb") as out:
                reader.copy_blob(blob, out, advance)
            hosted.complete_upload(repo, upload, blob.digest)
        except BaseException:
            with contextlib.suppress(errors.BlobUploadUnknown):  # completed or dropped already
                hosted.cancel_upload(repo, upload)
            raise
        added += 1
    for manifest in plan.manifests:  # children first, as `plan` lists them
        is_top = manifest.digest == entry.digest
        reference = tag if is_top and tag else manifest.digest
        hosted.put_manifest(repo, reference, manifest.media_type, manifest.body)
    return Moved(len(plan.manifests), len(plan.blobs), added, plan.size)
