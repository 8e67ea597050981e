"""What the rest of the code may ask of storage: `ContentStore` (by digest) and `Metadata` (per repository).

The mirror, the downloads, pins, archive import, the inventory and the commands use storage
only through these two Protocols; `proxy.mirror.mirror.open_storage` is the one place that
chooses and builds an implementation: `cache.store.DiskContentStore` and
`cache.meta.DiskMetadata` over diskcache's SQLite (whose internals only `cache.diskcache_sql`
touches), or with `[storage] backend = "s3"` `cache.bucket.BucketContentStore` (content in a
shared bucket, its index in Redis); each docstring below says how a shared store fits.

Conventions every implementation keeps:

- `cached_*` methods answer from this process's memory only: they never block and are
  called on the event loop (the hot path). `None` (or 0) means "ask the blocking `find_*`".
- Every other method blocks (disk, SQLite, a network round trip) and is called in a thread.
- Content is immutable and named by its digest, so any process may keep what it has read in
  memory; tag records may be stale in memory until `tag_ttl` has passed.
- Blobs are served from a local file. A store whose content lives elsewhere keeps a local
  hot tier (a size-bounded directory on this host) and returns files from it; `find_blob`
  fills the tier from the shared store when the blob is not there yet.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

_MANIFEST = "manifest:"

# How much is known about a digest in a repository (`Metadata` links); levels only rise.
LINKED = 1  # the repository holds it
EXPANDED = 2  # a manifest whose referenced digests are recorded as linked too


class IncompleteFile(Exception):
    """A staged file does not hold the bytes that were verified: it is not stored."""


class StoreUnavailable(Exception):
    """The shared object store cannot be reached now: nothing was stored or removed, retrying later may help."""


class MetadataUnavailable(Exception):
    """The shared metadata (Redis) cannot be reached now: callers fall back to the upstream or to memory."""


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored blob or manifest, for the cache tools."""

    digest: str
    is_manifest: bool
    size: int
    last_used: float  # wall clock
    pinned: bool

    @property
    def key(self) -> str:
        """Its content key, as `pin` and `remove` take it."""
        return manifest_key(self.digest) if self.is_manifest else self.digest


class BlobFile(NamedTuple):
    """A stored blob as a local file: its path and its size (the bytes that were verified)."""

    path: str
    size: int


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    checked_at: float  # when the upstream last confirmed it (wall clock, shared by workers)


# `DiskMetadata` pickles tag records, naming their class by module: the name they have had on disk
# since the first release, so caches stay readable by every version (`cache.meta` imports it).
TagRecord.__module__ = "cache.meta"


class ReferrersRecord(NamedTuple):
    checked_at: float  # when the upstream was last asked (wall clock)
    body: bytes | None  # the image index it answered; None: there were none


def manifest_key(digest: str) -> str:
    """The content key of a manifest; a blob's key is its digest. Keys name entries for pins and removal."""
    return _MANIFEST + digest


def is_manifest_key(key: str) -> bool:
    return key.startswith(_MANIFEST)


def key_digest(key: str) -> str:
    """The digest a content key names."""
    return key.removeprefix(_MANIFEST)


class Operation(enum.Enum):
    """Requests to an object store (`cache.bucket`), for the latency metric."""

    HEAD = "head"
    GET = "get"
    PUT = "put"
    DELETE = "delete"
    LIST = "list"


@runtime_checkable
class Presigning(Protocol):
    """A store whose blobs a client can fetch from the object store itself (`[storage] redirect`)."""

    def presigned_url(self, digest: str, expires: timedelta) -> str | None:
        """Blocking: a URL that serves the blob (Range too) until `expires` has passed; None if not stored."""
        ...


@runtime_checkable
class ContentStore(Protocol):
    """Blobs and manifests by digest, shared by every upstream, bounded by least-recently-used eviction.

    One store is shared by the server's workers and the commands on the same cache. Besides the
    content it keeps an index of each entry's size, last use and pin, which eviction weighs:
    on disk that is diskcache's SQLite table, beside the files; on S3 + Redis the objects are
    in S3 and the index in Redis (a hash of sizes, a sorted set of last uses, a set of pins), so
    that every host's eviction sees every host's uses.
    """

    @property
    def max_size(self) -> int:
        """Bytes the entries and the downloads in flight may take together."""
        ...

    @property
    def directory(self) -> Path:
        """This host's directory of the store: downloads' locks live here, shared by this host's processes."""
        ...

    @property
    def partial_dir(self) -> Path:
        """Where downloads and imports stage files for `put_blob`, on the same filesystem as the local files."""
        ...

    @property
    def evictions(self) -> int:
        """Entries this process has evicted, for the metrics."""
        ...

    # Bytes of downloads in flight, which count against `max_size` too (`cache.flight` sets it).
    in_flight: Callable[[], int]

    # -- blobs -------------------------------------------------------------------------

    def cached_blob_path(self, digest: str) -> BlobFile | None:
        """Memory only, the hot path: the blob's local file if this process has found it before.

        Counts as a use (recorded by `flush_touches`). The file may have been evicted since:
        opening it then fails, and the caller calls `forget_path` and `find_blob`.
        """
        ...

    def find_blob(self, digest: str) -> BlobFile | None:
        """Blocking: the blob's local file, or None if the store does not hold it.

        A file whose size is not the recorded one is removed, not returned. An object store
        downloads the object into its local hot tier first (staged, size-checked, renamed),
        so the caller can always open a path.
        """
        ...

    def stored_path(self, digest: str) -> str | None:
        """Blocking: the stored file of `digest` as it is, for a verification that reports damage
        rather than repairing it (never removed here, whatever its size)."""
        ...

    def forget_path(self, digest: str) -> None:
        """Memory only: the remembered file is gone (evicted by another process); drop it."""
        ...

    def put_blob(self, digest: str, staged: Path, size: int | None = None) -> None:
        """Blocking: take over a verified file in `partial_dir` (moved, not copied) and evict down to the limit.

        `size` is the number of bytes that were verified: a file of another size raises
        `IncompleteFile` and is not stored. The entry becomes visible only once its bytes are
        durable (flushed; on S3, once the upload has completed), never half-written. An object
        store uploads it and keeps the file as its local copy.
        """
        ...

    def has_blob(self, digest: str) -> bool:
        """Blocking: whether the store holds the blob (locally or, for an object store, remotely)."""
        ...

    # -- manifests ---------------------------------------------------------------------

    def cached_manifest(self, digest: str) -> Manifest | None:
        """Memory only, the hot path; counts as a use."""
        ...

    def find_manifest(self, digest: str) -> Manifest | None:
        """Blocking."""
        ...

    def put_manifest(self, manifest: Manifest) -> None:
        """Blocking. A manifest already stored is left as it is (same bytes; it may be pinned)."""
        ...

    # -- uses, pins, eviction ----------------------------------------------------------

    def pin(self, keys: Iterable[str]) -> None:
        """Blocking: keep these entries (blob digests, `manifest_key`s) out of eviction."""
        ...

    def keep_pinned(self, keys: set[str]) -> None:
        """Blocking: make `keys` the whole pinned set; entries pinned before and not named are unpinned."""
        ...

    def flush_touches(self) -> int:
        """Blocking: record the uses queued by the `cached_*` hits as recent, in one batch; returns how many."""
        ...

    def make_room(self, in_flight: int) -> int:
        """Blocking: evict until the entries and `in_flight` bytes fit in `max_size`.

        Returns the bytes left free; negative when pinned entries leave too little room, and
        then nothing is evicted (in vain).
        """
        ...

    def remove(self, key: str) -> bool:
        """Blocking: delete a blob digest or `manifest_key`; False if it was not there.

        A process that has the file open keeps reading it.
        """
        ...

    # -- inventory ---------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Blocking: every stored entry with its size, last use and pin."""
        ...

    def volume(self) -> int:
        """Blocking: bytes stored."""
        ...

    def count(self) -> int:
        """Blocking: blobs and manifests stored."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Metadata(Protocol):
    """Per upstream repository: what its tags point at, the tags it has, the digests it holds, its referrers.

    Keyed by upstream name too, so one repository name on two registries never mixes. Tag
    records and links are never evicted; referrers indexes (anyone may ask about any digest)
    are kept in a size-bounded store of their own. On Redis: a hash per repository for tag
    records, a set per repository for its tags and one for the repositories, a hash per
    repository for links (raised with a script, so levels only rise), and referrers under keys
    of their own with a bound on their total size.
    """

    # -- tags --------------------------------------------------------------------------

    def cached_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """Memory only, the hot path."""
        ...

    def find_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """Blocking."""
        ...

    def set_tag(self, upstream: str, repo: str, tag: str, digest: str) -> TagRecord:
        """Blocking: the upstream says `tag` points at `digest` now; also lists the tag and the repository."""
        ...

    def remove_tag(self, upstream: str, repo: str, tag: str) -> None:
        """Blocking. A running server may still answer from its memory until `tag_ttl` has passed."""
        ...

    def claim_tag_check(self, upstream: str, repo: str, tag: str, checked_at: float, seconds: float) -> bool:
        """Blocking: whether this process asks the upstream about `tag`, whose record of `checked_at` is stale.

        False while another process (a replica of the fleet) asks it, for at most `seconds`:
        its answer then shows in `find_tag`. So a tag is checked once per `tag_ttl` for the
        whole fleet. Claims are per record, so none needs releasing. On disk: always True.
        """
        ...

    def known_tags(self, upstream: str, repo: str) -> list[str]:
        """Blocking: tags this cache has seen, for answering `tags/list` while offline."""
        ...

    def repositories(self) -> list[tuple[str, str]]:
        """Blocking: every (upstream, repository) with a cached tag."""
        ...

    # -- links -------------------------------------------------------------------------

    def cached_link(self, upstream: str, repo: str, digest: str) -> int:
        """Memory only, the hot path: `LINKED`, `EXPANDED`, or 0 for "ask `find_link`"."""
        ...

    def find_link(self, upstream: str, repo: str, digest: str) -> int:
        """Blocking: `LINKED`, `EXPANDED`, or 0 if `repo` is not known to hold `digest`."""
        ...

    def add_links(self, upstream: str, repo: str, levels: dict[str, int]) -> None:
        """Blocking: record that `repo` holds these digests, all at once; levels only rise."""
        ...

    # -- referrers ---------------------------------------------------------------------

    def referrers(self, upstream: str, repo: str, digest: str) -> ReferrersRecord | None:
        """Blocking: when the referrers of `digest` were last fetched, and their index; None when nothing is known."""
        ...

    def set_referrers(self, upstream: str, repo: str, digest: str, index: bytes | None) -> None:
        """Blocking: store `digest`'s referrers index as just fetched; None for "there are none"."""
        ...

    def remember_no_referrers(self, upstream: str, repo: str, digest: str) -> None:
        """Blocking: `digest` has no referrers now; remembered in this process's bounded memory only.

        Any stored index of it is deleted, so no older one comes back later.
        """
        ...

    def close(self) -> None: ...
