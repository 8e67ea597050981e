"""`RedisIndex`: the hosted index (`proxy.hosted.index.HostedIndex`) in the Redis every replica shares.

With `[coordination]` every replica pushes into and serves the same hosted repositories, so
what they hold, the quotas' use and the uploads in progress are kept in Redis, under
`pullproxy:hosted:`. Writes that change several keys (a link and the volume it adds, a
manifest with its references, subject and tag) are Lua scripts, so each is atomic and a
reader never sees half of one. `write()` is a Redis lock (`SET NX PX` with a token, renewed
while held) that garbage collection and pushes share across the fleet, as SQLite's write lock
does across one host's processes; a replica that dies holding it frees it within
`LOCK_TIMEOUT`. Every method blocks (network round trips): call it in a thread. The keys are
built inside the scripts from the prefix, so this needs one Redis, not a Redis Cluster.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
import structlog
from redis.exceptions import LockError

from proxy import errors
from proxy.hosted.index import StoredManifest

log = structlog.get_logger("pullproxy.hosted")

PREFIX = "pullproxy:hosted:"
LOCK_TIMEOUT = 30.0  # seconds a holder that stopped renewing keeps the write lock
LOCK_WAIT = 60.0  # seconds a writer waits for it before answering 503
_RENEW_EVERY = LOCK_TIMEOUT / 3
_OUTAGE = (redis.ConnectionError, redis.TimeoutError)
F = TypeVar("F", bound=Callable[..., Any])

_LINK = """
local P, repo, d, size, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
redis.call('HSETNX', P..'repos', repo, now)
if not redis.call('HGET', P..'links:'..repo, d) then
  redis.call('INCRBY', P..'rbytes:'..repo, size)
  if redis.call('HINCRBY', P..'digests', d, 1) == 1 then
    redis.call('HSET', P..'sizes', d, size)
    redis.call('INCRBY', P..'volume', size)
  end
end
redis.call('HSET', P..'links:'..repo, d, size)
redis.call('HSET', P..'linked:'..repo, d, now)
"""

_UNLINK = """
local P, repo, d = ARGV[1], ARGV[2], ARGV[3]
local size = redis.call('HGET', P..'links:'..repo, d)
if not size then return 0 end
redis.call('HDEL', P..'links:'..repo, d)
redis.call('HDEL', P..'linked:'..repo, d)
redis.call('DECRBY', P..'rbytes:'..repo, size)
if redis.call('HINCRBY', P..'digests', d, -1) <= 0 then
  redis.call('HDEL', P..'digests', d)
  redis.call('HDEL', P..'sizes', d)
  redis.call('DECRBY', P..'volume', size)
end
return 1
"""

_REFRESH = """
local P, repo, d, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not redis.call('HGET', P..'links:'..repo, d) then return 0 end
redis.call('HSET', P..'linked:'..repo, d, now)
return 1
"""

_PUT_MANIFEST = """
local P, repo, d, mt, body = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local subject, kind, tag, now = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
redis.call('HSETNX', P..'repos', repo, now)
if redis.call('SADD', P..'manifests:'..repo, d) == 1 then
  local key = P..'m:'..repo..'@'..d
  redis.call('HSET', key, 'type', mt, 'body', body)
  if subject ~= '' then
    redis.call('HSET', key, 'subject', subject)
    redis.call('SADD', P..'subject:'..repo..'@'..subject, d)
  end
  if kind ~= '' then redis.call('HSET', key, 'kind', kind) end
  redis.call('INCRBY', P..'mvolume', #body)
  redis.call('INCRBY', P..'mbytes:'..repo, #body)
  for i = 10, #ARGV do
    if redis.call('SADD', P..'refs:'..repo..'@'..d, ARGV[i]) == 1 then
      redis.call('HINCRBY', P..'refcount:'..repo, ARGV[i], 1)
    end
  end
end
if tag ~= '' then redis.call('HSET', P..'tags:'..repo, tag, d) end
"""

_DELETE_MANIFEST = """
local P, repo, d = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SREM', P..'manifests:'..repo, d) == 0 then return 0 end
local key = P..'m:'..repo..'@'..d
local body = redis.call('HGET', key, 'body')
local n = 0
if body then n = #body end
redis.call('DECRBY', P..'mvolume', n)
redis.call('DECRBY', P..'mbytes:'..repo, n)
local subject = redis.call('HGET', key, 'subject')
if subject then redis.call('SREM', P..'subject:'..repo..'@'..subject, d) end
redis.call('DEL', key)
local refs = P..'refs:'..repo..'@'..d
for _, r in ipairs(redis.call('SMEMBERS', refs)) do
  if redis.call('HINCRBY', P..'refcount:'..repo, r, -1) <= 0 then redis.call('HDEL', P..'refcount:'..repo, r) end
end
redis.call('DEL', refs)
local tags = redis.call('HGETALL', P..'tags:'..repo)
for i = 1, #tags, 2 do
  if tags[i + 1] == d then redis.call('HDEL', P..'tags:'..repo, tags[i]) end
end
return 1
"""

_UPLOAD_SIZE = """
local P, upload, size = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', P..'uploads', upload) == 1 then redis.call('HSET', P..'upload_sizes', upload, size) end
"""


def _unavailable(error: Exception) -> errors.Unavailable:
    return errors.unavailable(f"hosted repositories are unavailable: the fleet's Redis does not answer ({error})")


def _outage_is_503(method: F) -> F:
    """Redis unreachable: `errors.Unavailable` (503, retry later) rather than an internal error."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except _OUTAGE as exc:
            raise _unavailable(exc) from exc

    return wrapped  # type: ignore[return-value]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisIndex:
    """Implements `proxy.hosted.index.HostedIndex` on a sync redis-py client (the index is used from threads)."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._local = threading.local()
        self._held: set[Any] = set()  # locks this process holds, renewed by `_renewer`
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None
        self._scripts = {
            name: client.register_script(source)
            for name, source in {
                "link": _LINK,
                "unlink": _UNLINK,
                "refresh": _REFRESH,
                "put_manifest": _PUT_MANIFEST,
                "delete_manifest": _DELETE_MANIFEST,
                "upload_size": _UPLOAD_SIZE,
            }.items()
        }

    def _key(self, *parts: str) -> str:
        return self._prefix + "".join(parts)

    def _run(self, script: str, *args: str | bytes | int) -> int:
        result = self._scripts[script](args=[self._prefix, *args])
        return int(result or 0)

    # -- the write lock ----------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """The fleet's write lock for a block; nests within a thread (inner ones join the outer)."""
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        lock = self._redis.lock(
            self._key("write"), timeout=LOCK_TIMEOUT, blocking_timeout=LOCK_WAIT, sleep=0.01, thread_local=False
        )
        try:
            acquired = lock.acquire()
        except _OUTAGE as exc:
            raise _unavailable(exc) from exc
        if not acquired:
            raise errors.unavailable(f"the hosted index is busy: its write lock was not free within {LOCK_WAIT:.0f}s")
        self._hold(lock)
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._held_lock:
                self._held.discard(lock)
            try:
                lock.release()
            except LockError:  # it expired: someone may have written meanwhile; say so
                log.warning("the hosted index's write lock expired before it was released")
            except _OUTAGE:  # it expires by itself
                log.warning("the hosted index's write lock could not be released: Redis does not answer")

    def _hold(self, lock: Any) -> None:
        with self._held_lock:
            self._held.add(lock)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, name="hosted-lock-renewer", daemon=True)
                self._renewer.start()

    def _renew(self) -> None:
        """Every `_RENEW_EVERY`: push the expiry of each lock this process holds out to `LOCK_TIMEOUT` again."""
        while not self._closed.wait(_RENEW_EVERY):
            with self._held_lock:
                held = list(self._held)
            for lock in held:
                try:
                    lock.reacquire()
                except (LockError, redis.RedisError) as exc:
                    log.warning("renewing the hosted index's write lock failed", error=str(exc))

    # -- repositories ------------------------------------------------------------------

    def repositories(self) -> list[str]:
        return sorted(_text(name) for name in self._redis.hkeys(self._key("repos")))

    def has_repository(self, repo: str) -> bool:
        return bool(self._redis.hexists(self._key("repos"), repo))

    def repository_count(self) -> int:
        return int(self._redis.hlen(self._key("repos")))

    def add_repository(self, repo: str) -> None:
        self._redis.hsetnx(self._key("repos"), repo, repr(time.time()))

    def repository_sizes(self) -> list[tuple[str, int, int, int]]:
        names = self.repositories()
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.get(self._key("rbytes:", name))
            pipe.get(self._key("mbytes:", name))
            pipe.hlen(self._key("tags:", name))
            pipe.scard(self._key("manifests:", name))
        answers = pipe.execute()
        rows = []
        for i, name in enumerate(names):
            blobs, manifests, tags, count = answers[4 * i : 4 * i + 4]
            rows.append((name, int(blobs or 0) + int(manifests or 0), int(tags), int(count)))
        return rows

    # -- blobs -------------------------------------------------------------------------

    def blob_size(self, repo: str, digest: str) -> int | None:
        size = self._redis.hget(self._key("links:", repo), digest)
        return None if size is None else int(size)

    def link_blob(self, repo: str, digest: str, size: int) -> None:
        self._run("link", repo, digest, size, repr(time.time()))

    def needed_blob(self, repo: str, digest: str, fresh: float) -> int | None:
        """Reads only while the link is fresh; the refresh takes the write lock, so a gc running meanwhile wins."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._key("links:", repo), digest)
        pipe.hget(self._key("linked:", repo), digest)
        size, linked = pipe.execute()
        if size is None:
            return None
        if linked is not None and float(linked) >= fresh:
            return int(size)
        with self.write():
            refreshed = self._run("refresh", repo, digest, repr(time.time()))
        return int(size) if refreshed else None

    def unlink_blob(self, repo: str, digest: str) -> bool:
        return self._run("unlink", repo, digest) > 0

    def linked_digests(self) -> set[str]:
        return {_text(digest) for digest in self._redis.hkeys(self._key("digests"))}

    def linking(self, digest: str) -> list[str]:
        return sorted(repo for repo, linked, _ in self._links() if digest in linked)

    def manifest_bodies(self) -> Iterator[tuple[str, str, bytes]]:
        for repo in sorted(self.repositories()):
            for digest in sorted(_text(d) for d in self._redis.smembers(self._key("manifests:", repo))):
                stored = self._stored(repo, digest)
                if stored is not None:
                    yield repo, digest, stored.body

    def _links(self) -> Iterator[tuple[str, dict[str, float], set[str]]]:
        """(repo, linked time by digest, digests some manifest of it names) of every repository."""
        names = self.repositories()
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._key("linked:", name))
            pipe.hkeys(self._key("refcount:", name))
        answers = pipe.execute()
        for i, name in enumerate(names):
            linked, referenced = answers[2 * i], answers[2 * i + 1]
            yield name, {_text(d): float(t) for d, t in linked.items()}, {_text(d) for d in referenced}

    def unreferenced_links(self, before: float) -> list[tuple[str, str]]:
        return [
            (repo, digest)
            for repo, linked, referenced in self._links()
            for digest, at in linked.items()
            if at < before and digest not in referenced
        ]

    def referenced_links(self) -> list[tuple[str, str]]:
        return [
            (repo, digest) for repo, linked, referenced in self._links() for digest in linked if digest in referenced
        ]

    # -- manifests and tags ------------------------------------------------------------

    def _stored(self, repo: str, digest: str) -> StoredManifest | None:
        media_type, body, kind = self._redis.hmget(self._key("m:", repo, "@", digest), ["type", "body", "kind"])
        if media_type is None or body is None:
            return None
        raw = body if isinstance(body, bytes) else str(body).encode()
        return StoredManifest(digest, _text(media_type), raw, None if kind is None else _text(kind))

    def manifest(self, repo: str, reference: str) -> StoredManifest | None:
        if ":" not in reference:
            digest = self._redis.hget(self._key("tags:", repo), reference)
            if digest is None:
                return None
            reference = _text(digest)
        return self._stored(repo, reference)

    def has_manifest(self, repo: str, digest: str) -> bool:
        return bool(self._redis.sismember(self._key("manifests:", repo), digest))

    def manifest_count(self, repo: str) -> int:
        return int(self._redis.scard(self._key("manifests:", repo)))

    def blob_volume(self) -> int:
        return int(self._redis.get(self._key("volume")) or 0)

    def manifest_volume(self) -> int:
        return int(self._redis.get(self._key("mvolume")) or 0)

    def put_manifest(
        self, repo: str, manifest: StoredManifest, subject: str | None, references: list[str], tag: str | None
    ) -> None:
        self._run(
            "put_manifest",
            repo,
            manifest.digest,
            manifest.media_type,
            manifest.body,
            subject or "",
            manifest.artifact_type or "",
            tag or "",
            repr(time.time()),
            *sorted(set(references)),
        )

    def delete_manifest(self, repo: str, digest: str) -> bool:
        return self._run("delete_manifest", repo, digest) > 0

    def tagged(self) -> list[tuple[str, str, str]]:
        names = self.repositories()
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._key("tags:", name))
        rows = []
        for name, tags in zip(names, pipe.execute(), strict=True):
            rows.extend(sorted((name, _text(tag), _text(digest)) for tag, digest in tags.items()))
        return rows

    def delete_tag(self, repo: str, tag: str) -> bool:
        return bool(self._redis.hdel(self._key("tags:", repo), tag))

    def tags(self, repo: str) -> list[str]:
        return sorted(_text(tag) for tag in self._redis.hkeys(self._key("tags:", repo)))

    def referrers(self, repo: str, subject: str) -> list[StoredManifest]:
        digests = sorted(_text(d) for d in self._redis.smembers(self._key("subject:", repo, "@", subject)))
        found = [self._stored(repo, digest) for digest in digests]
        return [manifest for manifest in found if manifest is not None]

    # -- uploads -----------------------------------------------------------------------

    def add_upload(self, upload: str, repo: str, owner: str | None = None) -> None:
        record = json.dumps({"repo": repo, "started": time.time(), "owner": owner})
        self._redis.hset(self._key("uploads"), upload, record)

    def _upload(self, upload: str) -> dict[str, Any] | None:
        record = self._redis.hget(self._key("uploads"), upload)
        if record is None:
            return None
        parsed: dict[str, Any] = json.loads(record)
        return parsed

    def upload_repository(self, upload: str) -> str | None:
        record = self._upload(upload)
        return None if record is None else str(record["repo"])

    def upload_owner(self, upload: str) -> str | None:
        record = self._upload(upload)
        owner = None if record is None else record.get("owner")
        return owner if isinstance(owner, str) else None

    def set_upload_size(self, upload: str, size: int) -> None:
        self._run("upload_size", upload, size)

    def upload_volume(self) -> int:
        return sum(int(size) for size in self._redis.hvals(self._key("upload_sizes")))

    def hold_blob(self, upload: str, digest: str) -> None:
        self._redis.hset(self._key("holds"), upload, digest)

    def held_digests(self) -> set[str]:
        return {_text(digest) for digest in self._redis.hvals(self._key("holds"))}

    def remove_upload(self, upload: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(self._key("uploads"), upload)
        pipe.hdel(self._key("upload_sizes"), upload)
        pipe.hdel(self._key("holds"), upload)
        pipe.execute()

    def uploads(self) -> list[tuple[str, float]]:
        records = self._redis.hgetall(self._key("uploads"))
        return [(_text(upload), float(json.loads(record)["started"])) for upload, record in records.items()]

    def close(self) -> None:
        self._closed.set()
        self._redis.close()


# Every method but the lock (which maps its own) and close: an outage is a 503 wherever it strikes.
for _name, _member in list(vars(RedisIndex).items()):
    if not _name.startswith("_") and _name not in ("write", "close") and callable(_member):
        setattr(RedisIndex, _name, _outage_is_503(_member))
