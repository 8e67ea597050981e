"""What each hosted repository holds: blobs, manifests (bodies included), tags, referrers, uploads.

`HostedIndex` is what `HostedRepositories` asks of it; `Index` (here) keeps it in SQLite for
one host, `proxy.hosted.redis_index.RedisIndex` in Redis for a fleet of replicas.

`Index`: one SQLite file in WAL mode with `synchronous=FULL`, shared by the server's workers and the
commands: a push is acknowledged only after its transaction is on disk, so `kill -9` or a
power loss loses nothing acknowledged, and what was not committed is not visible. Writes that
must not interleave with garbage collection (a blob moved into the store and linked, a
manifest checked against the blobs it names) run inside `write()`, which takes SQLite's write
lock (`BEGIN IMMEDIATE`) across processes. Every method blocks: call it in a thread.

A blob link's `linked` is when the repository last needed the blob (linked, found by a `HEAD`
or `GET`, mounted), so gc keeps a blob a client just saw until its manifest arrives.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos(name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blobs(
    repo TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL, linked REAL NOT NULL,
    PRIMARY KEY(repo, digest));
CREATE INDEX IF NOT EXISTS blobs_by_digest ON blobs(digest);
CREATE TABLE IF NOT EXISTS manifests(
    repo TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, body BLOB NOT NULL,
    subject TEXT, artifact_type TEXT, PRIMARY KEY(repo, digest));
CREATE INDEX IF NOT EXISTS manifests_by_subject ON manifests(repo, subject);
CREATE TABLE IF NOT EXISTS refs(repo TEXT NOT NULL, manifest TEXT NOT NULL, digest TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS refs_by_manifest ON refs(repo, manifest);
CREATE INDEX IF NOT EXISTS refs_by_digest ON refs(repo, digest);
CREATE TABLE IF NOT EXISTS tags(repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY(repo, tag));
CREATE TABLE IF NOT EXISTS uploads(id TEXT PRIMARY KEY, repo TEXT NOT NULL, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS holds(upload TEXT PRIMARY KEY, digest TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: str
    media_type: str
    body: bytes
    artifact_type: str | None = None


@runtime_checkable
class HostedIndex(Protocol):
    """Blobs linked per repository, manifests, tags, referrers and uploads; every method blocks.

    `write()` is the lock garbage collection and pushes share: across processes (SQLite's write
    lock) or across replicas (a Redis lock). Writes outside it are each atomic on their own.
    """

    def write(self) -> contextlib.AbstractContextManager[None]:
        """Hold the write lock for a block; nests (inner ones join the outer)."""
        ...

    def repositories(self) -> list[str]: ...

    def has_repository(self, repo: str) -> bool: ...

    def repository_count(self) -> int: ...

    def add_repository(self, repo: str) -> None: ...

    def repository_sizes(self) -> list[tuple[str, int, int, int]]:
        """(name, bytes of its blobs and manifests, tags, manifests) of every repository, by name."""
        ...

    def blob_size(self, repo: str, digest: str) -> int | None: ...

    def link_blob(self, repo: str, digest: str, size: int) -> None: ...

    def needed_blob(self, repo: str, digest: str, fresh: float) -> int | None:
        """The size of `digest` if `repo` holds it, its link refreshed unless it was needed since `fresh`."""
        ...

    def unlink_blob(self, repo: str, digest: str) -> bool: ...

    def linked_digests(self) -> set[str]: ...

    def linking(self, digest: str) -> list[str]:
        """The repositories that link `digest`, by name."""
        ...

    def manifest_bodies(self) -> Iterator[tuple[str, str, bytes]]:
        """(repo, digest, body) of every manifest, for verification."""
        ...

    def unreferenced_links(self, before: float) -> list[tuple[str, str]]:
        """(repo, digest) of blobs linked before `before` that no manifest of their repository names."""
        ...

    def referenced_links(self) -> list[tuple[str, str]]: ...

    def manifest(self, repo: str, reference: str) -> StoredManifest | None:
        """By digest, or by tag."""
        ...

    def has_manifest(self, repo: str, digest: str) -> bool: ...

    def manifest_count(self, repo: str) -> int: ...

    def blob_volume(self) -> int:
        """Bytes of the distinct blobs some repository links."""
        ...

    def manifest_volume(self) -> int: ...

    def put_manifest(
        self, repo: str, manifest: StoredManifest, subject: str | None, references: list[str], tag: str | None
    ) -> None: ...

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """The manifest, the tags on it and what it references (the blobs stay linked until gc)."""
        ...

    def tagged(self) -> list[tuple[str, str, str]]:
        """(repo, tag, manifest digest) of every tag, by repository and tag."""
        ...

    def delete_tag(self, repo: str, tag: str) -> bool: ...

    def tags(self, repo: str) -> list[str]: ...

    def referrers(self, repo: str, subject: str) -> list[StoredManifest]: ...

    def add_upload(self, upload: str, repo: str, owner: str | None = None) -> None:
        """An upload started; `owner`: the URL of the replica staging its bytes (None: this host)."""
        ...

    def upload_repository(self, upload: str) -> str | None: ...

    def upload_owner(self, upload: str) -> str | None:
        """The URL of the replica staging the upload; None for this host's (or an unknown) upload."""
        ...

    def set_upload_size(self, upload: str, size: int) -> None:
        """How many bytes the upload holds now, for `upload_volume`."""
        ...

    def upload_volume(self) -> int | None:
        """Bytes of every upload in progress; None: not recorded (count this host's staged files)."""
        ...

    def hold_blob(self, upload: str, digest: str) -> None:
        """The upload is storing `digest` (outside `write()`): gc keeps it until the upload is removed."""
        ...

    def held_digests(self) -> set[str]:
        """Digests uploads in progress are storing (`hold_blob`)."""
        ...

    def remove_upload(self, upload: str) -> None:
        """The upload's record, its size and its hold."""
        ...

    def uploads(self) -> list[tuple[str, float]]:
        """(id, start time) of every upload in progress."""
        ...

    def close(self) -> None: ...


class Index:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self.write():
            for statement in _statements():
                self._db.execute(statement)

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """One transaction holding the write lock of every process; nests (inner ones join the outer)."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _one(self, sql: str, *args: object) -> tuple[object, ...] | None:
        with self._lock:
            row: tuple[object, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def _run(self, sql: str, *args: object) -> int:
        with self.write():
            return self._db.execute(sql, args).rowcount

    # -- repositories ------------------------------------------------------------------

    def repositories(self) -> list[str]:
        return [str(row[0]) for row in self._all("SELECT name FROM repos ORDER BY name")]

    def has_repository(self, repo: str) -> bool:
        return self._one("SELECT 1 FROM repos WHERE name = ?", repo) is not None

    def repository_count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM repos")
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    def add_repository(self, repo: str) -> None:
        self._run("INSERT OR IGNORE INTO repos VALUES (?, ?)", repo, time.time())

    def repository_sizes(self) -> list[tuple[str, int, int, int]]:
        """(name, bytes of its blobs and manifests, tags, manifests) of every repository, by name."""
        rows = self._all(
            "SELECT name,"
            " (SELECT COALESCE(SUM(size), 0) FROM blobs WHERE repo = name)"
            " + (SELECT COALESCE(SUM(LENGTH(body)), 0) FROM manifests WHERE repo = name),"
            " (SELECT COUNT(*) FROM tags WHERE repo = name),"
            " (SELECT COUNT(*) FROM manifests WHERE repo = name)"
            " FROM repos ORDER BY name"
        )
        return [(str(n), int(b), int(t), int(m)) for n, b, t, m in rows]  # type: ignore[call-overload]

    # -- blobs -------------------------------------------------------------------------

    def blob_size(self, repo: str, digest: str) -> int | None:
        """The size of `digest` if `repo` holds it."""
        row = self._one("SELECT size FROM blobs WHERE repo = ? AND digest = ?", repo, digest)
        return None if row is None else int(row[0])  # type: ignore[call-overload]

    def link_blob(self, repo: str, digest: str, size: int) -> None:
        with self.write():
            self.add_repository(repo)
            self._run("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", repo, digest, size, time.time())

    def needed_blob(self, repo: str, digest: str, fresh: float) -> int | None:
        """The size of `digest` if `repo` holds it, its link refreshed unless it was needed since `fresh`.

        Reads only while the link is fresh (a `GET` or `HEAD` of a blob pulled often writes
        nothing); the refresh rechecks under the write lock, so a gc that ran meanwhile wins.
        """
        row = self._one("SELECT size, linked FROM blobs WHERE repo = ? AND digest = ?", repo, digest)
        if row is None:
            return None
        size: int = int(row[0])  # type: ignore[call-overload]
        linked: float = float(row[1])  # type: ignore[arg-type]
        if linked >= fresh:
            return size
        updated = self._run("UPDATE blobs SET linked = ? WHERE repo = ? AND digest = ?", time.time(), repo, digest)
        return size if updated else None

    def unlink_blob(self, repo: str, digest: str) -> bool:
        return self._run("DELETE FROM blobs WHERE repo = ? AND digest = ?", repo, digest) > 0

    def linked_digests(self) -> set[str]:
        return {str(row[0]) for row in self._all("SELECT DISTINCT digest FROM blobs")}

    def linking(self, digest: str) -> list[str]:
        """The repositories that link `digest`, by name."""
        rows = self._all("SELECT repo FROM blobs WHERE digest = ? ORDER BY repo", digest)
        return [str(row[0]) for row in rows]

    def unreferenced_links(self, before: float) -> list[tuple[str, str]]:
        """(repo, digest) of blobs linked before `before` that no manifest of their repository names."""
        rows = self._all(
            "SELECT repo, digest FROM blobs b WHERE linked < ? AND NOT EXISTS"
            " (SELECT 1 FROM refs r WHERE r.repo = b.repo AND r.digest = b.digest)",
            before,
        )
        return [(str(repo), str(digest)) for repo, digest in rows]

    def referenced_links(self) -> list[tuple[str, str]]:
        """(repo, digest) of blobs some manifest of their repository names."""
        rows = self._all(
            "SELECT repo, digest FROM blobs b WHERE EXISTS"
            " (SELECT 1 FROM refs r WHERE r.repo = b.repo AND r.digest = b.digest)"
        )
        return [(str(repo), str(digest)) for repo, digest in rows]

    # -- manifests and tags ------------------------------------------------------------

    def manifest(self, repo: str, reference: str) -> StoredManifest | None:
        """By digest, or by tag."""
        if ":" not in reference:
            row = self._one("SELECT digest FROM tags WHERE repo = ? AND tag = ?", repo, reference)
            if row is None:
                return None
            reference = str(row[0])
        found = self._one(
            "SELECT digest, media_type, body, artifact_type FROM manifests WHERE repo = ? AND digest = ?",
            repo,
            reference,
        )
        if found is None:
            return None
        digest, media_type, body, kind = found
        return StoredManifest(str(digest), str(media_type), bytes(body), None if kind is None else str(kind))  # type: ignore[call-overload]

    def manifest_bodies(self) -> Iterator[tuple[str, str, bytes]]:
        """(repo, digest, body) of every manifest, by repository and digest, read a page at a time."""
        last = ("", "")
        while True:
            rows = self._all(
                "SELECT repo, digest, body FROM manifests WHERE (repo, digest) > (?, ?)"
                " ORDER BY repo, digest LIMIT 500",
                *last,
            )
            if not rows:
                return
            for repo, digest, body in rows:
                yield str(repo), str(digest), bytes(body)  # type: ignore[call-overload]
            last = (str(rows[-1][0]), str(rows[-1][1]))

    def has_manifest(self, repo: str, digest: str) -> bool:
        return self._one("SELECT 1 FROM manifests WHERE repo = ? AND digest = ?", repo, digest) is not None

    def manifest_count(self, repo: str) -> int:
        row = self._one("SELECT COUNT(*) FROM manifests WHERE repo = ?", repo)
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    def blob_volume(self) -> int:
        """Bytes of the distinct blobs some repository links."""
        row = self._one("SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT digest, size FROM blobs)")
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    def manifest_volume(self) -> int:
        row = self._one("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM manifests")
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    def put_manifest(
        self,
        repo: str,
        manifest: StoredManifest,
        subject: str | None,
        references: list[str],
        tag: str | None,
    ) -> None:
        with self.write():
            self.add_repository(repo)
            if not self.has_manifest(repo, manifest.digest):
                self._run(
                    "INSERT INTO manifests VALUES (?, ?, ?, ?, ?, ?)",
                    repo,
                    manifest.digest,
                    manifest.media_type,
                    manifest.body,
                    subject,
                    manifest.artifact_type,
                )
                for digest in set(references):
                    self._run("INSERT INTO refs VALUES (?, ?, ?)", repo, manifest.digest, digest)
            if tag is not None:
                self._run("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", repo, tag, manifest.digest)

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """The manifest, the tags on it and what it references (the blobs stay linked until gc)."""
        with self.write():
            if self._run("DELETE FROM manifests WHERE repo = ? AND digest = ?", repo, digest) == 0:
                return False
            self._run("DELETE FROM refs WHERE repo = ? AND manifest = ?", repo, digest)
            self._run("DELETE FROM tags WHERE repo = ? AND digest = ?", repo, digest)
            return True

    def tagged(self) -> list[tuple[str, str, str]]:
        """(repo, tag, manifest digest) of every tag, by repository and tag."""
        rows = self._all("SELECT repo, tag, digest FROM tags ORDER BY repo, tag")
        return [(str(repo), str(tag), str(digest)) for repo, tag, digest in rows]

    def delete_tag(self, repo: str, tag: str) -> bool:
        return self._run("DELETE FROM tags WHERE repo = ? AND tag = ?", repo, tag) > 0

    def tags(self, repo: str) -> list[str]:
        return [str(row[0]) for row in self._all("SELECT tag FROM tags WHERE repo = ? ORDER BY tag", repo)]

    def referrers(self, repo: str, subject: str) -> list[StoredManifest]:
        rows = self._all(
            "SELECT digest, media_type, body, artifact_type FROM manifests WHERE repo = ? AND subject = ?"
            " ORDER BY digest",
            repo,
            subject,
        )
        return [
            StoredManifest(str(d), str(m), bytes(b), None if a is None else str(a))  # type: ignore[call-overload]
            for d, m, b, a in rows
        ]

    # -- uploads -----------------------------------------------------------------------

    def add_upload(self, upload: str, repo: str, owner: str | None = None) -> None:
        """`owner` is not kept: one host stages every upload of its index."""
        self._run("INSERT INTO uploads VALUES (?, ?, ?)", upload, repo, time.time())

    def upload_repository(self, upload: str) -> str | None:
        row = self._one("SELECT repo FROM uploads WHERE id = ?", upload)
        return None if row is None else str(row[0])

    def upload_owner(self, upload: str) -> str | None:
        return None

    def set_upload_size(self, upload: str, size: int) -> None:
        """Not kept: the staged files are on this host, `upload_volume` says to count them."""

    def upload_volume(self) -> int | None:
        return None

    def hold_blob(self, upload: str, digest: str) -> None:
        self._run("INSERT OR REPLACE INTO holds VALUES (?, ?)", upload, digest)

    def held_digests(self) -> set[str]:
        return {str(row[0]) for row in self._all("SELECT DISTINCT digest FROM holds")}

    def remove_upload(self, upload: str) -> None:
        with self.write():
            self._run("DELETE FROM uploads WHERE id = ?", upload)
            self._run("DELETE FROM holds WHERE upload = ?", upload)

    def uploads(self) -> list[tuple[str, float]]:
        return [(str(i), float(s)) for i, s in self._all("SELECT id, started FROM uploads")]  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _statements() -> list[str]:
    return [statement.strip() for statement in _SCHEMA.split(";") if statement.strip()]
