"""What the cache holds, per tagged image, and the tools' operations on it: list, remove, verify.

All blocking, for a command running next to a server on the same directory. Blobs are
shared between images, so removing an image deletes only what no other cached tag needs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cache import digests
from cache.manifests import MAX_LEVELS, refs
from cache.readers import READ_SIZE
from cache.storage import ContentStore, Entry, Metadata, manifest_key


@dataclass
class Tree:
    """What a manifest needs, as far as the cache knows: manifests held, blobs named, children not held."""

    manifests: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)
    platforms: tuple[int, int] | None = None  # (cached, listed) for an index
    found: bool = True

    def store_keys(self) -> set[str]:
        return {manifest_key(d) for d in self.manifests} | self.blobs


def tree(store: ContentStore, digest: str) -> Tree:
    """Each manifest is read once however often indexes list it, and no deeper than `MAX_LEVELS`."""
    result = Tree()
    held: dict[str, bool] = {}

    def walk(current: str, level: int) -> bool:
        if current in held:
            return held[current]
        manifest = store.find_manifest(current) if level <= MAX_LEVELS else None
        held[current] = manifest is not None
        if manifest is None:
            return False
        result.manifests.add(current)
        found = refs(manifest.body)
        result.blobs.update(b.digest for b in found.blobs)
        cached = sum(walk(child.digest, level + 1) for child in found.manifests)
        if found.manifests and current == digest:
            result.platforms = (cached, len(found.manifests))
        return True

    result.found = walk(digest, 1)
    return result


@dataclass(frozen=True)
class Image:
    upstream: str
    repo: str
    tag: str
    digest: str
    size: int  # of what is cached
    last_used: float | None
    pinned: bool
    complete: bool  # every blob of the cached manifests is cached
    platforms: tuple[int, int] | None


def images(store: ContentStore, meta: Metadata) -> list[Image]:
    """Every tag the cache knows, with the size and last use of its cached content."""
    entries = {e.key: e for e in store.entries()}
    listed = []
    for upstream, repo in meta.repositories():
        for tag in meta.known_tags(upstream, repo):
            record = meta.find_tag(upstream, repo, tag)
            if record is None:
                continue
            needed = tree(store, record.digest)
            held: list[Entry] = [entries[key] for key in needed.store_keys() if key in entries]
            listed.append(
                Image(
                    upstream,
                    repo,
                    tag,
                    record.digest,
                    size=sum(e.size for e in held),
                    last_used=max((e.last_used for e in held), default=None),
                    pinned=manifest_key(record.digest) in entries and entries[manifest_key(record.digest)].pinned,
                    complete=needed.found and needed.blobs <= entries.keys(),
                    platforms=needed.platforms,
                )
            )
    return listed


def remove(store: ContentStore, meta: Metadata, upstream: str, repo: str, reference: str) -> tuple[list[str], int]:
    """Forget a tag (or every tag of `repo` at a digest) and delete what no other tag needs.

    Returns the tags removed and the bytes freed.
    """
    if digests.is_digest(reference):
        top = reference
        tags = [t for t in meta.known_tags(upstream, repo) if _points_at(meta, upstream, repo, t, reference)]
    else:
        record = meta.find_tag(upstream, repo, reference)
        if record is None:
            return [], 0
        top, tags = record.digest, [reference]
    for tag in tags:
        meta.remove_tag(upstream, repo, tag)
    doomed = tree(store, top).store_keys()
    for other_upstream, other_repo in meta.repositories():
        for tag in meta.known_tags(other_upstream, other_repo):
            record = meta.find_tag(other_upstream, other_repo, tag)
            if record is not None:
                doomed -= tree(store, record.digest).store_keys()
    sizes = {e.key: e.size for e in store.entries()}
    freed = sum(sizes.get(key, 0) for key in doomed if store.remove(key))
    return tags, freed


def _points_at(meta: Metadata, upstream: str, repo: str, tag: str, digest: str) -> bool:
    record = meta.find_tag(upstream, repo, tag)
    return record is not None and record.digest == digest


def verify(store: ContentStore, advance: Callable[[int], None]) -> list[str]:
    """Re-hash every blob and manifest; delete the ones that do not match (or whose file is gone)."""
    bad = []
    for entry in store.entries():
        if entry.is_manifest:
            manifest = store.find_manifest(entry.digest)
            ok = manifest is not None and _matches(entry.digest, manifest.body)
        else:
            found = store.find_blob(entry.digest)
            ok = found is not None and file_matches(entry.digest, found.path, advance)
        if not ok:
            store.remove(entry.key)
            bad.append(entry.digest)
    return bad


def _matches(digest: str, data: bytes) -> bool:
    try:
        return digests.matches(digest, data)
    except digests.InvalidDigest:
        return False


def file_matches(digest: str, path: str, advance: Callable[[int], None]) -> bool:
    """Whether the file's bytes have `digest` (False if it is gone); `advance` is told each chunk read."""
    try:
        check = digests.Check(digest)
        with open(path, "rb") as source:
            while chunk := source.read(READ_SIZE):
                check.update(chunk)
                advance(len(chunk))
    except (digests.InvalidDigest, FileNotFoundError):
        return False
    return check.matches()


def directory_size(path: os.PathLike[str] | str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a download finished meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total
