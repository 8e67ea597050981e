"""`BucketContentStore`: blobs and manifests in an S3 bucket every replica shares, indexed in Redis.

Objects are named `<prefix>blobs/<algorithm>/<hex>` and `<prefix>manifests/<algorithm>/<hex>`
(a manifest's media type is its object's Content-Type). The index lives in Redis under
`pullproxy:<prefix>`: a hash of sizes, a sorted set of last uses, a set of pins and a volume
counter, changed only by scripts so the counter always sums the hash. The bucket is the truth
of what is stored; the index is what eviction weighs: an object the index lacks (Redis lost its
data, or was down when it was stored) is indexed again when found, an entry whose object is
gone is dropped when noticed. So with Redis unreachable blobs and manifests still serve, from
the local tier or the bucket, and nothing stored is lost.

Each host keeps a local hot tier, a `DiskContentStore` of its own size: blobs are served from
its files, filled from the bucket when first asked for (staged, size-checked, renamed; not
hashed again: only verified bytes are ever uploaded). An object is indexed only once its upload
has completed, so no replica ever sees half of one. Hits are queued and written to Redis in one
script call per `flush_touches`, which also tells which of them the fleet has removed meanwhile
(their local copies go). Eviction is least recently used across the fleet, by one evictor at a
time (a Redis lock), and counts every host's downloads in flight, which each host publishes.
Bucket unreachable: what the local tier holds still serves, the rest raises `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import obstore
import redis
import structlog
from obstore.store import S3Store

from cache.storage import (
    BlobFile,
    Entry,
    IncompleteFile,
    Manifest,
    Operation,
    StoreUnavailable,
    is_manifest_key,
    key_digest,
    manifest_key,
)
from cache.store import DiskContentStore

log = structlog.get_logger("pullproxy")

T = TypeVar("T")

UNBOUNDED = (1 << 63) - 1  # `max_size` of a store that never evicts
EVICTOR_TTL_MS = 30_000  # the evictor's lock expires if its holder dies
EVICTOR_WAIT = 10.0  # how long a process waits for another's eviction before it gives up evicting
FLIGHT_TTL = 60.0  # a host's published downloads in flight count for this long (it republishes every flush)
TOUCH_BATCH = 1000  # keys per touch script call
FETCH_CHUNK = 1 << 20  # bytes per read of an object streamed into the local tier
REQUEST_TIMEOUT = timedelta(hours=1)  # a whole request, body included
READ_TIMEOUT = timedelta(seconds=30)  # no byte for this long: the transfer has stalled
UPLOAD_CONCURRENCY = 4  # parts of one multipart upload in flight (5 MiB each)
WARN_EVERY = 30.0  # seconds between warnings about the same unreachable service
LISTING_TTL = 30.0  # how long a listing of the bucket stands in for the index (Redis down)
REBUILD_TTL_MS = 600_000  # the lock of the replica rebuilding a lost index
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


# Scripts keep the index whole: each changes sizes, uses, pins and the volume together.
_ADD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('INCRBY', KEYS[3], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[1])
return 0
"""
_REMOVE = """
local size = redis.call('HGET', KEYS[1], ARGV[1])
if not size then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[3], size)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return tonumber(size)
"""
_TOUCH = """
local missing = {}
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], 'GT', ARGV[1], ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
"""
_PIN = """
if ARGV[1] == '1' then redis.call('DEL', KEYS[2]) end
local pinned = 0
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    pinned = pinned + redis.call('SADD', KEYS[2], ARGV[i])
  end
end
return pinned
"""
_PINNED_VOLUME = """
local total = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  total = total + tonumber(redis.call('HGET', KEYS[1], key) or '0')
end
return total
"""
_OLDEST_UNPINNED = """
local start = 0
while true do
  local page = redis.call('ZRANGE', KEYS[1], start, start + 99)
  if #page == 0 then return false end
  for _, key in ipairs(page) do
    if redis.call('SISMEMBER', KEYS[2], key) == 0 then return key end
  end
  start = start + 100
end
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def open_bucket(endpoint: str, bucket: str, region: str, access_key: str | None, secret_key: str | None) -> S3Store:
    """The S3 client for `[storage]`: an outage fails a request in a fraction of a second (a few quick
    retries), not after obstore's default three minutes, so callers answer 503 while it lasts; a
    transfer may take long, but not stall."""
    credentials: dict[str, Any] = {}
    if access_key is not None and secret_key is not None:
        credentials = {"access_key_id": access_key, "secret_access_key": secret_key}
    return S3Store(
        bucket,
        endpoint=endpoint,
        region=region,
        virtual_hosted_style_request=False,
        client_options={
            "allow_http": endpoint.startswith("http://"),
            "connect_timeout": timedelta(seconds=2),
            # obstore's default bounds a whole request by 30 s, body included: a large layer's GET
            # takes longer. A stalled transfer is caught by the read timeout instead.
            "timeout": REQUEST_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
        },
        retry_config={
            "max_retries": 2,
            "retry_timeout": timedelta(seconds=5),
            "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1), "base": 2},
        },
        **credentials,
    )


def open_redis(url: str) -> redis.Redis:
    """A Redis client that gives up on an unreachable server within seconds (callers then fall back)."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


def object_path(prefix: str, key: str) -> str:
    """The object name of a content key: `<prefix>blobs/sha256/<hex>` or `<prefix>manifests/sha256/<hex>`."""
    algorithm, _, hexdigest = key_digest(key).partition(":")
    kind = "manifests" if is_manifest_key(key) else "blobs"
    return f"{prefix}{kind}/{algorithm}/{hexdigest}"


def _key_of(prefix: str, path: str) -> str | None:
    """The content key an object name stands for, or None for another object."""
    kind, _, rest = path.removeprefix(prefix).partition("/")
    algorithm, _, hexdigest = rest.partition("/")
    if not algorithm or not hexdigest or "/" in hexdigest:
        return None
    digest = f"{algorithm}:{hexdigest}"
    return {"blobs": digest, "manifests": manifest_key(digest)}.get(kind)


class BucketContentStore:
    """Implements `cache.storage.ContentStore` on an S3 bucket (content) and Redis (its index), with a local hot tier.

    `max_size` bounds the content in the bucket (None: never evicts, as hosted content needs);
    `local_max_size` this host's copies in `local_dir`. Every blocking method may raise
    `StoreUnavailable` when the bucket is needed and cannot be reached.
    """

    def __init__(
        self,
        bucket: S3Store,
        redis: redis.Redis,
        local_dir: Path,
        max_size: int | None,
        local_max_size: int,
        prefix: str = "cache/",
    ) -> None:
        self.bucket = bucket
        self.redis = redis
        self.prefix = prefix
        self._limit = max_size
        self.local = DiskContentStore(local_dir, local_max_size)
        self.directory = local_dir
        self.partial_dir = self.local.partial_dir
        self.evictions = 0  # entries this process evicted from the bucket; read by the proxy's metrics
        # Bytes of this host's downloads in flight (`cache.flight` sets it); published for every host's eviction.
        self.in_flight: Callable[[], int] = lambda: 0
        self.local.in_flight = lambda: self.in_flight()  # the local tier keeps room for them too
        # Told of every object store request: what it was, how long it took, whether it failed (the metrics).
        self.observe: Callable[[Operation, float, bool], None] = lambda operation, seconds, failed: None
        base = f"pullproxy:{prefix}"
        self._sizes, self._used, self._pins = base + "sizes", base + "used", base + "pins"
        self._volume, self._evictor, self._flight = base + "volume", base + "evictor", base + "flight"
        self._indexed = base + "indexed"  # set once the index holds every object of the bucket
        self._host = _host_id(local_dir)
        self._add = redis.register_script(_ADD)
        self._remove = redis.register_script(_REMOVE)
        self._touch = redis.register_script(_TOUCH)
        self._pin = redis.register_script(_PIN)
        self._pinned_volume = redis.register_script(_PINNED_VOLUME)
        self._oldest_unpinned = redis.register_script(_OLDEST_UNPINNED)
        self._release = redis.register_script(_RELEASE)
        self._extend = redis.register_script(_EXTEND)
        self._touched: set[str] = set()
        self._lock = threading.Lock()
        self._fetches: dict[str, threading.Lock] = {}  # digest -> the lock of its fetch into the local tier
        self._warned: dict[str, float] = {}
        self._listed: tuple[float, list[tuple[str, int, float]]] | None = None  # (when, what)

    @property
    def max_size(self) -> int:
        return UNBOUNDED if self._limit is None else self._limit

    # -- blobs -------------------------------------------------------------------------

    def cached_blob_path(self, digest: str) -> BlobFile | None:
        found = self.local.cached_blob_path(digest)
        if found is not None:
            with self._lock:
                self._touched.add(digest)
        return found

    def find_blob(self, digest: str) -> BlobFile | None:
        """Blocking: the local copy if the fleet still holds the blob, else the object fetched into the local tier."""
        local = self.local.find_blob(digest)
        if local is not None:
            if self._still_stored(digest):
                return local
            self.local.remove(digest)
            return None
        size = self._stored_size(digest)
        if size is None:
            return None
        return self._fetch_blob(digest, size)

    def stored_path(self, digest: str) -> str | None:
        """Blocking: a local file of the blob as stored (the bucket's object fetched when there is no local copy)."""
        found = self.find_blob(digest)
        return None if found is None else found.path

    def forget_path(self, digest: str) -> None:
        self.local.forget_path(digest)

    def put_blob(self, digest: str, staged: Path, size: int | None = None) -> None:
        """Blocking: upload a verified file (unless the bucket has it already), index it, keep it as the local copy."""
        actual = os.stat(staged).st_size
        if size is not None and actual != size:
            raise IncompleteFile(f"{staged.name} holds {actual} bytes, not the {size} verified for {digest}")
        path = object_path(self.prefix, digest)
        if self._head(path) != actual:  # another replica may have stored it just now
            self._call(
                Operation.PUT,
                lambda: obstore.put(self.bucket, path, staged, max_concurrency=UPLOAD_CONCURRENCY),
            )
        self._index(digest, actual)  # only now, the upload complete, may another replica find it
        self.local.put_blob(digest, staged, actual)
        self._cull()

    def has_blob(self, digest: str) -> bool:
        try:
            return self._stored_size(digest) is not None
        except StoreUnavailable:
            if self.local.has_blob(digest):
                return True
            raise

    # -- manifests ---------------------------------------------------------------------

    def cached_manifest(self, digest: str) -> Manifest | None:
        found = self.local.cached_manifest(digest)
        if found is not None:
            with self._lock:
                self._touched.add(manifest_key(digest))
        return found

    def find_manifest(self, digest: str) -> Manifest | None:
        key = manifest_key(digest)
        local = self.local.find_manifest(digest)
        if local is not None:
            if self._still_stored(key):
                return local
            self.local.remove(key)
            return None
        if self._stored_size(key) is None:
            return None
        try:
            got = self._call(Operation.GET, lambda: obstore.get(self.bucket, object_path(self.prefix, key)))
            body = bytes(self._call(Operation.GET, got.bytes))
        except FileNotFoundError:
            self._unindex(key)
            return None
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm not in hashlib.algorithms_available or hashlib.new(algorithm, body).hexdigest() != hexdigest:
            log.warning("a manifest in the bucket does not match its digest; removed", digest=digest)
            self.remove(key)
            return None
        manifest = Manifest(digest, str(got.attributes.get("Content-Type", "")), body)
        self.local.put_manifest(manifest)
        return manifest

    def put_manifest(self, manifest: Manifest) -> None:
        key = manifest_key(manifest.digest)
        with contextlib.suppress(*_REDIS_DOWN):
            if self.redis.hexists(self._sizes, key):
                self.local.put_manifest(manifest)
                return
        path = object_path(self.prefix, key)
        self._call(
            Operation.PUT,
            lambda: obstore.put(self.bucket, path, manifest.body, attributes={"Content-Type": manifest.media_type}),
        )
        self._index(key, len(manifest.body))
        self.local.put_manifest(manifest)
        self._cull()

    # -- uses, pins, eviction ----------------------------------------------------------

    def pin(self, keys: Iterable[str]) -> None:
        self._pins_script(list(keys), replace=False)

    def keep_pinned(self, keys: set[str]) -> None:
        self._pins_script(sorted(keys), replace=True)
        self._cull()  # what was unpinned may now be over the limit

    def _pins_script(self, keys: list[str], replace: bool) -> None:
        try:
            self._pin(keys=[self._sizes, self._pins], args=["1" if replace else "0", *keys])
        except _REDIS_DOWN as exc:
            raise StoreUnavailable(f"the cache's index (Redis) is unreachable, pins cannot be set: {exc}") from exc

    def flush_touches(self) -> int:
        """Blocking: record queued hits in Redis; drop the local copies of what the fleet has removed meanwhile."""
        self.local.flush_touches()
        with self._lock:
            keys, self._touched = self._touched, set()
        try:
            self._publish_in_flight(self.in_flight())
            self._rebuild_if_lost()
            missing: list[str] = []
            ordered = sorted(keys)
            now = time.time()
            for start in range(0, len(ordered), TOUCH_BATCH):
                batch = ordered[start : start + TOUCH_BATCH]
                gone = self._touch(keys=[self._sizes, self._used], args=[now, *batch])
                missing.extend(_text(key) for key in cast(list[bytes], gone))
        except _REDIS_DOWN as exc:
            self._warn("redis", "the cache's index (Redis) is unreachable: uses are not recorded", exc)
            return 0
        for key in missing:
            with contextlib.suppress(StoreUnavailable):  # kept for now; looked at again on its next use
                if self._head(object_path(self.prefix, key)) is None:
                    self.local.remove(key)
                else:  # stored but not indexed (Redis lost it): indexed again
                    self._reindex(key)
        return len(keys)

    def _rebuild_if_lost(self) -> None:
        """Blocking: without the marker a complete index leaves (Redis lost its data, or never held this
        store's), index every object of the bucket, by one replica: an object missing from the index
        would never be evicted.

        Last uses are the objects' upload times. Entries added meanwhile are counted once (`_ADD`).
        """
        if self.redis.exists(self._indexed):
            return
        token = secrets.token_hex(8)
        lock = self._indexed + ":rebuilding"
        if not self.redis.set(lock, token, nx=True, px=REBUILD_TTL_MS):
            return
        try:
            listed = self._listing(fresh=True)
            log.info("indexing the bucket's content again", prefix=self.prefix, entries=len(listed))
            with self.redis.pipeline(transaction=False) as pipe:
                for key, size, modified in listed:
                    self._add(keys=[self._sizes, self._used, self._volume], args=[key, size, modified], client=pipe)
                pipe.set(self._indexed, time.time())
                pipe.execute()
        except StoreUnavailable:
            pass  # tried again on the next flush
        finally:
            self._release(keys=[lock], args=[token])

    def make_room(self, in_flight: int) -> int:
        """Blocking: evict fleet-wide until the bucket's content and every host's downloads fit in max_size;
        also make room in the local tier. Returns the smaller room left."""
        self.flush_touches()
        local = self.local.make_room(in_flight)
        try:
            return min(local, self._evict(in_flight))
        except _REDIS_DOWN as exc:
            # Nothing is lost by letting the bucket grow a little meanwhile; eviction resumes with Redis.
            self._warn("redis", "the cache's index (Redis) is unreachable: nothing is evicted", exc)
            return local

    def _cull(self) -> None:
        try:
            self._evict(self.in_flight())
        except _REDIS_DOWN as exc:
            self._warn("redis", "the cache's index (Redis) is unreachable: nothing is evicted", exc)

    def _evict(self, in_flight: int) -> int:
        """Evict the least recently used unpinned entries, one at a time, under the fleet's evictor lock.

        Returns the room left; negative when pinned entries and downloads leave too little, and
        then nothing is evicted (in vain).
        """
        if self._limit is None:
            return UNBOUNDED
        demand = in_flight + self._publish_in_flight(in_flight)
        left = self._limit - int(self.redis.get(self._volume) or 0) - demand
        if left >= 0:  # the common case: no lock, no eviction
            return left
        pinned = int(self._pinned_volume(keys=[self._sizes, self._pins]))
        if self._limit - pinned - demand < 0:
            return self._limit - pinned - demand
        with self._evicting() as mine:
            for _ in range(100_000):
                left = self._limit - int(self.redis.get(self._volume) or 0) - demand
                if left >= 0 or not mine:
                    return left
                oldest = self._oldest_unpinned(keys=[self._used, self._pins])
                if oldest is None:
                    return left
                self._drop(_text(oldest))
                with self._lock:
                    self.evictions += 1
                self._extend(keys=[self._evictor], args=[mine, EVICTOR_TTL_MS])
        return self._limit - int(self.redis.get(self._volume) or 0) - demand

    @contextlib.contextmanager
    def _evicting(self) -> Iterator[str]:
        """The fleet's evictor lock: yields its token, or "" when another held it for `EVICTOR_WAIT` (then
        it has been evicting meanwhile, and this caller only measures)."""
        token = secrets.token_hex(8)
        deadline = time.monotonic() + EVICTOR_WAIT
        while not self.redis.set(self._evictor, token, nx=True, px=EVICTOR_TTL_MS):
            if time.monotonic() > deadline:
                yield ""
                return
            time.sleep(0.05)
        try:
            yield token
        finally:
            with contextlib.suppress(*_REDIS_DOWN):
                self._release(keys=[self._evictor], args=[token])

    def _publish_in_flight(self, in_flight: int) -> int:
        """Record this host's downloads in flight; returns every other live host's."""
        now = time.time()
        self.redis.hset(self._flight, self._host, f"{in_flight} {now}")
        others = 0
        stale: list[str] = []
        for host, value in cast(dict[bytes, bytes], self.redis.hgetall(self._flight)).items():
            name = _text(host)
            if name == self._host:
                continue
            amount, _, when = _text(value).partition(" ")
            try:
                if now - float(when) > FLIGHT_TTL:
                    stale.append(name)
                else:
                    others += int(amount)
            except ValueError:
                stale.append(name)
        if stale:
            self.redis.hdel(self._flight, *stale)
        return others

    def remove(self, key: str) -> bool:
        """Blocking: delete from the bucket, the index and this host's tier (other hosts drop theirs on next use).

        The object goes first: with the bucket unreachable nothing is removed (`StoreUnavailable`).
        """
        path = object_path(self.prefix, key)
        stored = self._head(path) is not None
        self._call(Operation.DELETE, lambda: obstore.delete(self.bucket, path))
        try:
            indexed = self._unindex(key)
        except StoreUnavailable:  # Redis down: the entry is dropped when next looked up
            indexed = False
        return self.local.remove(key) or stored or indexed

    def _drop(self, key: str) -> None:
        """Evict one entry: its object first (a replica that finds the entry meanwhile finds no object and
        drops it), then its index entry and this host's copy."""
        path = object_path(self.prefix, key)
        self._call(Operation.DELETE, lambda: obstore.delete(self.bucket, path))
        self._remove(keys=[self._sizes, self._used, self._volume, self._pins], args=[key])
        self.local.remove(key)

    # -- inventory ---------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Blocking: from the index; with Redis unreachable, from a listing of the bucket (no uses, no pins)."""
        self.flush_touches()
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._sizes)
                pipe.zrange(self._used, 0, -1, withscores=True)
                pipe.smembers(self._pins)
                sizes, uses, pins = pipe.execute()
        except _REDIS_DOWN:
            return [
                Entry(key_digest(key), is_manifest_key(key), size, modified, False)
                for key, size, modified in self._listing()
            ]
        used = {_text(key): float(score) for key, score in uses}
        pinned = {_text(key) for key in pins}
        return [
            Entry(key_digest(key), is_manifest_key(key), int(size), used.get(key, 0.0), key in pinned)
            for key, size in ((_text(k), v) for k, v in sizes.items())
        ]

    def volume(self) -> int:
        try:
            return int(self.redis.get(self._volume) or 0)
        except _REDIS_DOWN:
            return sum(size for _, size, _ in self._listing())

    def count(self) -> int:
        try:
            return int(self.redis.hlen(self._sizes))
        except _REDIS_DOWN:
            return len(self._listing())

    def close(self) -> None:
        self.local.close()
        self.redis.close()

    # -- presigned URLs ----------------------------------------------------------------

    def presigned_url(self, digest: str, expires: timedelta) -> str | None:
        """Blocking: a URL that GETs the blob's object straight from the bucket until `expires` has passed
        (a Range header works on it); None when the bucket does not hold it or cannot be reached."""
        try:
            if self._stored_size(digest) is None:
                return None
        except StoreUnavailable:
            return None
        with self._lock:
            self._touched.add(digest)
        return obstore.sign(self.bucket, "GET", object_path(self.prefix, digest), expires)

    # -- the index and the bucket ------------------------------------------------------

    def _stored_size(self, key: str) -> int | None:
        """The size of a stored entry: from the index, else (not indexed, or Redis down) from the bucket."""
        try:
            size = self.redis.hget(self._sizes, key)
        except _REDIS_DOWN as exc:
            self._warn("redis", "the cache's index (Redis) is unreachable: asking the bucket", exc)
            return self._head(object_path(self.prefix, key))
        if size is not None:
            return int(cast(bytes, size))
        found = self._head(object_path(self.prefix, key))
        if found is not None:  # stored while Redis was down, or Redis lost it
            self._index(key, found)
        return found

    def _still_stored(self, key: str) -> bool:
        """Whether the fleet still holds an entry this host has a copy of; True when that cannot be told."""
        try:
            return self._stored_size(key) is not None
        except StoreUnavailable:
            return True

    def _reindex(self, key: str) -> None:
        size = self._head(object_path(self.prefix, key))
        if size is not None:
            self._index(key, size)

    def _index(self, key: str, size: int) -> None:
        """Make a stored object visible to eviction; with Redis down it is indexed when next found."""
        try:
            self._add(keys=[self._sizes, self._used, self._volume], args=[key, size, time.time()])
        except _REDIS_DOWN as exc:
            self._warn("redis", "the cache's index (Redis) is unreachable: stored, indexed later", exc)

    def _unindex(self, key: str) -> bool:
        try:
            return int(self._remove(keys=[self._sizes, self._used, self._volume, self._pins], args=[key])) >= 0
        except _REDIS_DOWN as exc:
            raise StoreUnavailable(f"the cache's index (Redis) is unreachable: {exc}") from exc

    def _head(self, path: str) -> int | None:
        try:
            return int(self._call(Operation.HEAD, lambda: obstore.head(self.bucket, path))["size"])
        except FileNotFoundError:
            return None

    def _fetch_blob(self, digest: str, size: int) -> BlobFile | None:
        """Blocking: GET the object into the local tier, staged and size-checked; one fetch per digest here."""
        with self._lock:
            lock = self._fetches.setdefault(digest, threading.Lock())
        try:
            with lock:
                found = self.local.find_blob(digest)  # fetched by another thread meanwhile
                if found is not None:
                    return found
                self._download(digest, size)
                return self.local.find_blob(digest)
        finally:
            with self._lock:
                if not lock.locked():
                    self._fetches.pop(digest, None)

    def _download(self, digest: str, size: int) -> None:
        path = object_path(self.prefix, digest)
        staged = self.partial_dir / f"bucket-{digest.replace(':', '-')}-{secrets.token_hex(4)}"
        try:
            try:
                got = self._call(Operation.GET, lambda: obstore.get(self.bucket, path))
            except FileNotFoundError:  # evicted meanwhile, or lost
                with contextlib.suppress(StoreUnavailable):
                    self._unindex(digest)
                return
            if got.meta["size"] != size:
                log.warning("an object in the bucket has another size than indexed; not used", digest=digest)
                return
            written = 0
            with open(staged, "xb") as file:
                stream = got.stream(min_chunk_size=FETCH_CHUNK)
                while written <= size:
                    chunk = self._call(Operation.GET, lambda: next(stream, None))
                    if chunk is None:
                        break
                    file.write(chunk)
                    written += len(chunk)
            if written != size:
                raise StoreUnavailable(f"the bucket sent {written} of the {size} bytes of {digest}")
            self.local.put_blob(digest, staged, size)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)

    def _listing(self, fresh: bool = False) -> list[tuple[str, int, float]]:
        """Blocking: (key, size, last modified) of every object under the prefix; a listing up to
        `LISTING_TTL` old unless `fresh` (while Redis is down, the metrics ask every few seconds)."""
        with self._lock:
            kept = self._listed
        if not fresh and kept is not None and time.monotonic() - kept[0] < LISTING_TTL:
            return kept[1]

        def listed() -> list[tuple[str, int, float]]:
            found = []
            for batch in obstore.list(self.bucket, prefix=self.prefix, chunk_size=1000):
                for meta in batch:
                    key = _key_of(self.prefix, meta["path"])
                    if key is not None:
                        found.append((key, int(meta["size"]), meta["last_modified"].timestamp()))
            return found

        found = self._call(Operation.LIST, listed)
        with self._lock:
            self._listed = (time.monotonic(), found)
        return found

    def _call(self, operation: Operation, request: Callable[[], T]) -> T:
        """One object store request, timed; an unreachable or refusing store raises `StoreUnavailable`.

        FileNotFoundError (no such object) passes through.
        """
        began = time.monotonic()
        failed = True
        try:
            result = request()
            failed = False
            return result
        except FileNotFoundError:
            failed = False
            raise
        except Exception as exc:
            raise StoreUnavailable(f"the object store is unreachable ({operation.value}): {_first_line(exc)}") from exc
        finally:
            self.observe(operation, time.monotonic() - began, failed)

    def _warn(self, what: str, message: str, exc: BaseException) -> None:
        """Log an outage at most every `WARN_EVERY` seconds per service, not once per request."""
        now = time.monotonic()
        with self._lock:
            if now - self._warned.get(what, -WARN_EVERY) < WARN_EVERY:
                return
            self._warned[what] = now
        log.warning(message, why=_first_line(exc))


def _host_id(directory: Path) -> str:
    """This host's name in the fleet's downloads-in-flight hash: one per local directory, which the
    host's processes share (each counts all of its downloads)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "host-id"
    try:
        return path.read_text().strip() or _new_host_id(path)
    except FileNotFoundError:
        return _new_host_id(path)


def _new_host_id(path: Path) -> str:
    staging = path.with_name(f"host-id-{secrets.token_hex(4)}")
    staging.write_text(secrets.token_hex(8))
    with contextlib.suppress(FileExistsError):
        os.link(staging, path)  # the first process's id wins
    os.unlink(staging)
    return path.read_text().strip()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
