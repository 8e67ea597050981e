"""`RedisMetadata`: `cache.storage.Metadata` in the Redis a fleet of replicas shares.

Tag records, tag lists, the repositories and links live in Redis so every replica sees what
any of them learnt: a tag's `checked_at` is the fleet's, so the upstream is asked about a
tag once per `tag_ttl` for the whole fleet, not once per replica. Keys (`<r>` is the upstream
name, percent-encoded so it holds no `/`, then `/` and the repository):

- `pullproxy:meta:tags:<r>` hash tag → "<checked_at> <digest>"; `pullproxy:meta:taglist:<r>`
  set of tags; `pullproxy:meta:repos` set of `<r>`.
- `pullproxy:meta:checking:<r>:<tag>@<checked_at>`: which replica asks the upstream about a
  stale tag record (SET NX, expiring), so the fleet asks once.
- `pullproxy:meta:links:<r>` hash digest → level, raised by a script so levels only rise
  whatever the order of concurrent writers.
- `pullproxy:meta:referrers` hash `<r>@<digest>` → "<checked_at>\\n" + "+" index or "-" (none),
  its sorted set of store times and its byte counter: one script stores a record and drops
  the least recently stored until the total fits `referrers_size`, since anyone may ask
  about any digest.

Redis is not the only copy that matters: when it cannot be reached (connection refused,
timed out) every blocking method raises `MetadataUnavailable` at once, without waiting for a
timeout per call: after a failure, calls fail fast for `RETRY_AFTER` seconds and then one
caller tries again. What this process learnt meanwhile is kept in its memory (tag records,
links); links are written to Redis when it answers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import quote, unquote

import redis
from cachetools import LRUCache
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache.storage import MetadataUnavailable, ReferrersRecord, TagRecord

PREFIX = "pullproxy:meta:"
REFERRERS_SIZE = 64 << 20  # bytes of stored referrers indexes, as on disk
NO_REFERRERS = 8192  # digests remembered, per process, as having none
PENDING_LINKS = 65536  # links learnt while Redis was away, kept to be written later
RETRY_AFTER = 1.0  # seconds calls fail fast after Redis failed, before one tries again
CONNECT_TIMEOUT = 0.5  # seconds; Redis is near, a request must never hang on it
COMMAND_TIMEOUT = 1.0

# Connection trouble; anything else (a wrong type, a script error) is a bug and propagates.
UNREACHABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,
)

_RAISE_LINKS = """
local out = {}
for i = 1, #ARGV, 2 do
  local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local level = tonumber(ARGV[i + 1])
  if stored < level then
    redis.call('HSET', KEYS[1], ARGV[i], level)
    stored = level
  end
  out[#out + 1] = stored
end
return out
"""

_REMOVE_TAG = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[2])
end
return 0
"""

# KEYS: records hash, store-time sorted set, byte counter; ARGV: field, value, now, limit.
_STORE_REFERRERS = """
local old = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if old > 0 then old = old + #ARGV[1] end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local total = redis.call('INCRBY', KEYS[3], #ARGV[1] + #ARGV[2] - old)
local limit = tonumber(ARGV[4])
while total > limit do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then break end
  local size = redis.call('HSTRLEN', KEYS[1], oldest[1])
  if redis.call('HDEL', KEYS[1], oldest[1]) == 1 then
    total = redis.call('DECRBY', KEYS[3], size + #oldest[1])
  end
end
return total
"""

_DROP_REFERRERS = """
local size = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[3], size + #ARGV[1])
end
return 0
"""

T = TypeVar("T")


def connect(url: str) -> redis.Redis:
    """A client for `url` that never makes a request wait long: short timeouts, one quick retry.

    The retry reconnects a pooled connection Redis closed (e.g. it restarted). A Redis that
    refuses connections fails at once, one that accepts them and never answers within two
    `COMMAND_TIMEOUT`s (no health-check PING, which would double that).
    """
    return redis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 1)
    )


@dataclass
class RedisHealth:
    """When Redis last answered and last failed (wall clock), from every user of it in this process."""

    last_ok: float | None = None
    last_error: tuple[float, str] | None = None

    def ok(self) -> None:
        self.last_ok = time.time()

    def failed(self, what: str) -> None:
        self.last_error = (time.time(), what)

    @property
    def problem(self) -> str | None:
        """Why Redis is taken as unreachable now (its last failure is newer than its last answer), else None."""
        error = self.last_error
        if error is None or (self.last_ok is not None and self.last_ok > error[0]):
            return None
        return error[1]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _repo(upstream: str, repo: str) -> str:
    return f"{quote(upstream, safe='')}/{repo}"


def _unrepo(member: bytes | str) -> tuple[str, str]:
    upstream, _, repo = _text(member).partition("/")
    return unquote(upstream), repo


def _tag_value(record: TagRecord) -> str:
    return f"{record.checked_at!r} {record.digest}"


def _tag_record(value: bytes | str) -> TagRecord:
    checked_at, _, digest = _text(value).partition(" ")
    return TagRecord(digest, float(checked_at))


class RedisMetadata:
    """Implements `cache.storage.Metadata` on Redis, with this process's memory in front (hot path)."""

    def __init__(
        self, client: redis.Redis, referrers_size: int = REFERRERS_SIZE, health: RedisHealth | None = None
    ) -> None:
        self.redis = client
        self.health = health or RedisHealth()
        self.referrers_size = referrers_size
        self._raise_links = client.register_script(_RAISE_LINKS)
        self._remove_tag = client.register_script(_REMOVE_TAG)
        self._store_referrers = client.register_script(_STORE_REFERRERS)
        self._drop_referrers = client.register_script(_DROP_REFERRERS)
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(maxsize=16384)
        self._links: LRUCache[tuple[str, str, str], int] = LRUCache(maxsize=65536)
        self._no_referrers: LRUCache[tuple[str, str, str], float] = LRUCache(maxsize=NO_REFERRERS)
        self._pending: dict[tuple[str, str], dict[str, int]] = {}  # links Redis has not taken yet
        self._pending_count = 0
        self._lock = threading.Lock()
        self._retry_at = float("-inf")  # monotonic: until then calls fail fast

    # -- reaching Redis ------------------------------------------------------------------

    def _call(self, work: Callable[[], T]) -> T:
        """Run `work` against Redis; `MetadataUnavailable` if Redis cannot be reached (or failed just now)."""
        now = time.monotonic()
        with self._lock:
            if now < self._retry_at:
                raise MetadataUnavailable(f"redis unreachable: {self.health.problem or 'failed just now'}")
            if self.health.problem is not None:
                # This caller probes; the others fail fast until it is done (a probe may take a timeout).
                self._retry_at = float("inf")
        try:
            result = work()
        except UNREACHABLE as exc:
            what = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._retry_at = time.monotonic() + RETRY_AFTER
                self.health.failed(what)
            raise MetadataUnavailable(f"redis unreachable: {what}") from exc
        except BaseException:
            with self._lock:
                self._retry_at = min(self._retry_at, time.monotonic() + RETRY_AFTER)  # not left at inf
            raise
        with self._lock:
            self._retry_at = float("-inf")
            self.health.ok()
            pending = self._pending
            self._pending, self._pending_count = {}, 0
        if pending:
            self._write_pending(pending)
        return result

    @property
    def pending(self) -> int:
        """Memory only: links learnt while Redis was away, not written yet."""
        return self._pending_count

    def write_pending(self) -> int:
        """Blocking: write the links learnt while Redis was away, if any; returns how many were pending.

        Called after a heartbeat reached Redis, as the hot path may not call Redis for a while.
        """
        with self._lock:
            count = self._pending_count
        if count:
            self._call(self.redis.ping)  # writes them once Redis answers
        return count

    def _write_pending(self, pending: dict[tuple[str, str], dict[str, int]]) -> None:
        """Links learnt while Redis was away: written now (put back if it failed again)."""
        try:
            for (upstream, repo), levels in pending.items():
                self._raise(upstream, repo, levels)
        except UNREACHABLE:
            with self._lock:
                for (upstream, repo), levels in pending.items():
                    self._keep_pending(upstream, repo, levels)

    def _keep_pending(self, upstream: str, repo: str, levels: dict[str, int]) -> None:
        """Under the lock: remember `levels` to write later, within `PENDING_LINKS`."""
        held = self._pending.setdefault((upstream, repo), {})
        for digest, level in levels.items():
            if digest not in held:
                if self._pending_count >= PENDING_LINKS:
                    continue  # forgotten: the upstream will be asked again
                self._pending_count += 1
            held[digest] = max(level, held.get(digest, 0))

    # -- tags ----------------------------------------------------------------------------

    def cached_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """Memory only, the hot path."""
        with self._lock:
            return self._tags.get((upstream, repo, tag))

    def find_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """Blocking: the fleet's record (its `checked_at` is when any replica last confirmed it)."""
        value = self._call(lambda: self.redis.hget(PREFIX + "tags:" + _repo(upstream, repo), tag))
        if value is None:
            return None
        record = _tag_record(value)
        with self._lock:
            self._tags[(upstream, repo, tag)] = record
        return record

    def set_tag(self, upstream: str, repo: str, tag: str, digest: str) -> TagRecord:
        """Blocking; kept in memory even when Redis cannot take it (then `MetadataUnavailable`)."""
        record = TagRecord(digest, time.time())
        with self._lock:
            self._tags[(upstream, repo, tag)] = record
        member = _repo(upstream, repo)

        def write() -> None:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(PREFIX + "tags:" + member, tag, _tag_value(record))
                pipe.sadd(PREFIX + "taglist:" + member, tag)
                pipe.sadd(PREFIX + "repos", member)
                pipe.execute()

        self._call(write)
        return record

    def remove_tag(self, upstream: str, repo: str, tag: str) -> None:
        """Blocking. Other replicas may still answer from their memory until `tag_ttl` has passed."""
        with self._lock:
            self._tags.pop((upstream, repo, tag), None)
        member = _repo(upstream, repo)
        keys = [PREFIX + "tags:" + member, PREFIX + "taglist:" + member, PREFIX + "repos"]
        self._call(lambda: self._remove_tag(keys=keys, args=[tag, member]))

    def claim_tag_check(self, upstream: str, repo: str, tag: str, checked_at: float, seconds: float) -> bool:
        """Blocking: SET NX of `pullproxy:meta:checking:<r>:<tag>@<checked_at>`, expiring after `seconds`."""
        key = f"{PREFIX}checking:{_repo(upstream, repo)}:{tag}@{checked_at!r}"
        return bool(self._call(lambda: self.redis.set(key, b"1", nx=True, px=max(1, int(seconds * 1000)))))

    def known_tags(self, upstream: str, repo: str) -> list[str]:
        """Blocking: tags the fleet has seen, for answering `tags/list` while offline."""
        members = self._call(lambda: cast(set[bytes], self.redis.smembers(PREFIX + "taglist:" + _repo(upstream, repo))))
        return sorted(_text(member) for member in members)

    def repositories(self) -> list[tuple[str, str]]:
        """Blocking: every (upstream, repository) with a cached tag."""
        members = self._call(lambda: cast(set[bytes], self.redis.smembers(PREFIX + "repos")))
        return sorted(_unrepo(member) for member in members)

    # -- links ---------------------------------------------------------------------------

    def cached_link(self, upstream: str, repo: str, digest: str) -> int:
        """Memory only, the hot path: LINKED, EXPANDED, or 0 for "ask `find_link`"."""
        with self._lock:
            return self._links.get((upstream, repo, digest), 0)

    def find_link(self, upstream: str, repo: str, digest: str) -> int:
        """Blocking."""
        value = self._call(lambda: self.redis.hget(PREFIX + "links:" + _repo(upstream, repo), digest))
        level = int(value) if value is not None else 0
        if level:
            with self._lock:
                self._links[(upstream, repo, digest)] = max(level, self._links.get((upstream, repo, digest), 0))
        return level

    def add_links(self, upstream: str, repo: str, levels: dict[str, int]) -> None:
        """Blocking: raised in one script, levels only rise. Kept in memory, and written later, when
        Redis cannot take them now (then `MetadataUnavailable`)."""
        if not levels:
            return
        with self._lock:
            for digest, level in levels.items():
                key = (upstream, repo, digest)
                self._links[key] = max(level, self._links.get(key, 0))
        try:
            self._call(lambda: self._raise(upstream, repo, levels))
        except MetadataUnavailable:
            with self._lock:
                self._keep_pending(upstream, repo, levels)
            raise

    def _raise(self, upstream: str, repo: str, levels: dict[str, int]) -> None:
        args: list[str | int] = []
        for digest, level in levels.items():
            args += [digest, level]
        stored = cast(list[int], self._raise_links(keys=[PREFIX + "links:" + _repo(upstream, repo)], args=args))
        with self._lock:
            for digest, level in zip(levels, stored, strict=True):
                key = (upstream, repo, digest)
                self._links[key] = max(int(level), self._links.get(key, 0))

    # -- referrers -----------------------------------------------------------------------

    def _referrers_keys(self) -> list[str]:
        return [PREFIX + "referrers", PREFIX + "referrers:stored", PREFIX + "referrers:bytes"]

    def referrers(self, upstream: str, repo: str, digest: str) -> ReferrersRecord | None:
        """Blocking: when the referrers of `digest` were last fetched and their index (None: there
        were none); None when nothing is known."""
        key = (upstream, repo, digest)
        with self._lock:
            checked_at = self._no_referrers.get(key)
        if checked_at is not None:
            return ReferrersRecord(checked_at, None)
        field = f"{_repo(upstream, repo)}@{digest}"
        value = self._call(lambda: self.redis.hget(PREFIX + "referrers", field))
        if value is None:
            return None
        stamp, _, rest = _bytes(value).partition(b"\n")
        return ReferrersRecord(float(stamp), rest[1:] if rest.startswith(b"+") else None)

    def set_referrers(self, upstream: str, repo: str, digest: str, index: bytes | None) -> None:
        """Blocking: store `digest`'s referrers index as just fetched; None for "there are none"."""
        now = time.time()
        value = repr(now).encode() + b"\n" + (b"-" if index is None else b"+" + index)
        field = f"{_repo(upstream, repo)}@{digest}"
        with self._lock:
            self._no_referrers.pop((upstream, repo, digest), None)
        self._call(
            lambda: self._store_referrers(keys=self._referrers_keys(), args=[field, value, now, self.referrers_size])
        )

    def remember_no_referrers(self, upstream: str, repo: str, digest: str) -> None:
        """Blocking: `digest` has no referrers now; kept in memory only, and any stored index deleted."""
        with self._lock:
            self._no_referrers[(upstream, repo, digest)] = time.time()
        field = f"{_repo(upstream, repo)}@{digest}"
        self._call(lambda: self._drop_referrers(keys=self._referrers_keys(), args=[field]))

    def close(self) -> None:
        self.redis.close()
