"""`BucketContentStore` against a real SeaweedFS bucket and redis-server: several "replicas" are stores
with local directories of their own sharing one bucket and one Redis."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import obstore
import pytest

from cache import bucket as bucket_module
from cache.bucket import BucketContentStore, Operation, object_path, open_bucket, open_redis
from cache.storage import IncompleteFile, Manifest, StoreUnavailable, manifest_key
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedFS

_prefixes = itertools.count()


Factory = Callable[..., BucketContentStore]


@pytest.fixture
def stores(weed: SeaweedFS, redis_server: RedisServer, tmp_path: Path) -> Iterator[Factory]:
    """Stores (replicas) on one bucket, Redis and a prefix of this test's own; a new local directory each."""
    prefix = f"t{next(_prefixes)}-{os.getpid()}/"
    made: list[BucketContentStore] = []
    names = itertools.count()

    def make(
        max_size: int | None = 1 << 30,
        local_max_size: int = 1 << 30,
        *,
        bucket_up: bool = True,
        redis_up: bool = True,
    ) -> BucketContentStore:
        endpoint = weed.endpoint if bucket_up else f"http://127.0.0.1:{free_port()}"
        client = open_redis(redis_server.url if redis_up else f"redis://127.0.0.1:{free_port()}/0")
        store = BucketContentStore(
            open_bucket(endpoint, weed.bucket, "us-east-1", weed.access_key, weed.secret_key),
            client,
            tmp_path / f"replica-{next(names)}",
            max_size,
            local_max_size,
            prefix=prefix,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def blob(store: BucketContentStore, data: bytes) -> tuple[str, Path]:
    """A verified file staged in the store's partial area, and its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    staged = store.partial_dir / f"staged-{digest[7:19]}-{time.monotonic_ns()}"
    staged.write_bytes(data)
    return digest, staged


def put(store: BucketContentStore, data: bytes) -> str:
    digest, staged = blob(store, data)
    store.put_blob(digest, staged, len(data))
    return digest


def in_bucket(store: BucketContentStore, key: str) -> bool:
    try:
        obstore.head(store.bucket, object_path(store.prefix, key))
    except FileNotFoundError:
        return False
    return True


def read(found: object) -> bytes:
    assert found is not None
    path, _ = found  # type: ignore[misc]
    return Path(path).read_bytes()


# -- sharing ---------------------------------------------------------------------------


def test_a_blob_stored_by_one_replica_is_found_by_another_from_the_bucket(stores: Factory) -> None:
    one, two = stores(), stores()
    digest = put(one, b"layer bytes" * 100)
    assert in_bucket(one, digest)
    assert two.cached_blob_path(digest) is None
    found = two.find_blob(digest)
    assert found is not None and found.size == 1100
    assert read(found) == b"layer bytes" * 100
    assert Path(found.path).is_relative_to(two.directory)  # served from its own local tier
    assert two.cached_blob_path(digest) == found
    assert two.has_blob(digest) and one.volume() == two.volume() == 1100 and two.count() == 1


def test_a_blob_larger_than_one_upload_part_is_stored_whole(stores: Factory) -> None:
    one, two = stores(), stores()
    data = os.urandom(12 << 20)  # a multipart upload of three parts
    digest = put(one, data)
    assert read(two.find_blob(digest)) == data


def test_a_transfer_is_bounded_by_stalls_not_by_obstores_30_second_request_timeout(weed: SeaweedFS) -> None:
    options = open_bucket(weed.endpoint, weed.bucket, "us-east-1", "k", "s").client_options
    assert options is not None  # as obstore reports them back
    assert (options.get("timeout"), options.get("read_timeout")) == ("1h", "30s")


def test_the_replica_that_stored_a_blob_keeps_the_verified_file_as_its_local_copy(stores: Factory) -> None:
    store = stores()
    digest, staged = blob(store, b"abc" * 10)
    inode = os.stat(staged).st_ino
    store.put_blob(digest, staged, 30)
    found = store.find_blob(digest)
    assert found is not None and os.stat(found.path).st_ino == inode  # moved, not copied or fetched again
    assert not staged.exists()


def test_a_file_of_another_size_than_verified_is_not_stored(stores: Factory) -> None:
    one, two = stores(), stores()
    digest, staged = blob(one, b"short")
    with pytest.raises(IncompleteFile):
        one.put_blob(digest, staged, 6)
    assert not in_bucket(one, digest) and not two.has_blob(digest) and two.count() == 0


def test_an_object_is_indexed_only_once_its_upload_completed(stores: Factory) -> None:
    """A replica whose bucket is unreachable stores nothing and indexes nothing; the staged file stays its caller's."""
    up, down = stores(), stores(bucket_up=False)
    digest, staged = blob(down, b"never half stored")
    with pytest.raises(StoreUnavailable):
        down.put_blob(digest, staged, 17)
    assert staged.exists()
    assert up.count() == 0 and not up.has_blob(digest) and up.find_blob(digest) is None


def test_a_blob_read_from_the_bucket_is_size_checked(stores: Factory) -> None:
    one, two = stores(), stores()
    digest = put(one, b"x" * 50)
    one.redis.hset(one._sizes, digest, 51)  # the index and the object disagree
    assert two.find_blob(digest) is None
    assert list(two.partial_dir.iterdir()) == []  # nothing staged is left behind either


def test_manifests_are_shared_with_their_media_type_and_checked_against_their_digest(stores: Factory) -> None:
    one, two, three = stores(), stores(), stores()
    body = b'{"schemaVersion":2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    one.put_manifest(Manifest(digest, "application/vnd.oci.image.manifest.v1+json", body))
    assert two.find_manifest(digest) == Manifest(digest, "application/vnd.oci.image.manifest.v1+json", body)
    assert two.cached_manifest(digest) is not None
    # Bytes in the bucket that do not hash to the digest are not served, and are removed.
    obstore.put(one.bucket, object_path(one.prefix, manifest_key(digest)), b"{}")
    assert three.find_manifest(digest) is None
    assert not in_bucket(one, manifest_key(digest)) and one.count() == 0


# -- eviction --------------------------------------------------------------------------


def test_eviction_is_least_recently_used_across_the_fleet(stores: Factory) -> None:
    one, two = stores(max_size=300), stores(max_size=300)
    first = put(one, b"1" * 100)
    second = put(one, b"2" * 100)
    assert two.find_blob(first) is not None and two.cached_blob_path(first) is not None  # a hit on another replica
    time.sleep(0.01)
    assert two.flush_touches() == 1
    put(one, b"3" * 150)  # over the limit: the least recently used anywhere goes
    assert not in_bucket(one, second) and one.find_blob(second) is None
    assert in_bucket(one, first) and one.volume() == 250
    assert one.evictions == 1


def test_pinned_entries_are_not_evicted_and_leave_no_room_when_they_fill_the_cache(stores: Factory) -> None:
    store = stores(max_size=300)
    pinned = put(store, b"p" * 200)
    store.pin([pinned])
    put(store, b"q" * 80)
    assert store.make_room(200) < 0  # pinned content leaves too little: nothing is evicted in vain
    assert store.count() == 2
    assert store.make_room(100) >= 0  # the unpinned one goes
    assert store.count() == 1 and store.has_blob(pinned)
    assert [e.pinned for e in store.entries()] == [True]
    store.keep_pinned(set())
    assert [e.pinned for e in store.entries()] == [False]


def test_every_hosts_downloads_in_flight_count_against_max_size(stores: Factory) -> None:
    one, two = stores(max_size=300), stores(max_size=300)
    kept = put(one, b"k" * 100)
    two.in_flight = lambda: 150  # another host downloading 150 bytes
    two.flush_touches()  # publishes them
    assert one.make_room(100) == 50  # 300 - 100 here - 150 there, once the stored 100 are evicted
    assert not one.has_blob(kept)


def test_one_evictor_at_a_time(stores: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bucket_module, "EVICTOR_WAIT", 0.3)
    store = stores(max_size=100)
    put(store, b"a" * 60)
    store.redis.set(store._evictor, "another replica", px=10_000)
    assert store.make_room(60) == -20  # measured, nothing evicted while another evicts
    assert store.count() == 1
    store.redis.delete(store._evictor)
    assert store.make_room(60) == 40 and store.count() == 0


def test_a_store_without_max_size_never_evicts(stores: Factory) -> None:
    store = stores(max_size=None, local_max_size=250 << 10)
    digests = [put(store, bytes([n]) * (100 << 10)) for n in range(3)]
    store.make_room(10 << 10)
    assert store.count() == 3 and all(in_bucket(store, digest) for digest in digests)
    assert store.local.count() < 3  # the local tier keeps to its own bound


# -- removal and the tools -------------------------------------------------------------


def test_a_removal_on_one_replica_drops_the_others_local_copies(stores: Factory) -> None:
    one, two = stores(), stores()
    digest = put(one, b"r" * 10)
    found = two.find_blob(digest)
    assert found is not None and two.cached_blob_path(digest) is not None
    assert one.remove(digest) and not in_bucket(one, digest)
    two.flush_touches()  # the hit it queued learns the entry is gone
    assert not Path(found.path).exists() and two.cached_blob_path(digest) is None
    assert two.find_blob(digest) is None and not one.remove(digest)


def test_entries_list_sizes_uses_and_pins(stores: Factory) -> None:
    store = stores()
    digest = put(store, b"e" * 7)
    body = b"{}"
    manifest = "sha256:" + hashlib.sha256(body).hexdigest()
    store.put_manifest(Manifest(manifest, "application/json", body))
    store.pin([manifest_key(manifest)])
    entries = sorted(store.entries(), key=lambda e: e.is_manifest)
    assert [(e.digest, e.is_manifest, e.size, e.pinned) for e in entries] == [
        (digest, False, 7, False),
        (manifest, True, 2, True),
    ]
    assert all(abs(e.last_used - time.time()) < 60 for e in entries)


# -- outages ---------------------------------------------------------------------------


def test_with_redis_unreachable_blobs_and_manifests_are_found_in_the_bucket(stores: Factory) -> None:
    one = stores()
    digest = put(one, b"z" * 20)
    body = b'{"m":1}'
    manifest = "sha256:" + hashlib.sha256(body).hexdigest()
    one.put_manifest(Manifest(manifest, "application/json", body))
    blind = stores(redis_up=False)
    assert blind.has_blob(digest) and read(blind.find_blob(digest)) == b"z" * 20
    assert blind.find_manifest(manifest) == Manifest(manifest, "application/json", body)
    assert blind.find_blob("sha256:" + "0" * 64) is None
    assert blind.count() == 2 and blind.volume() == 27  # from a listing of the bucket
    assert blind.make_room(10) > 0  # nothing evicted, nothing raised


def test_what_is_stored_while_redis_is_unreachable_is_indexed_when_next_found(stores: Factory) -> None:
    blind, one = stores(redis_up=False), stores()
    digest = put(blind, b"w" * 30)
    assert in_bucket(one, digest) and one.count() == 0
    assert one.has_blob(digest) and one.count() == 1 and one.volume() == 30


def test_a_lost_index_is_rebuilt_from_the_bucket_as_entries_are_found(stores: Factory) -> None:
    one = stores()
    digest = put(one, b"l" * 40)
    one.flush_touches()
    one.redis.delete(one._sizes, one._used, one._volume)  # lost, but not the marker: nothing listed
    two = stores()
    assert two.flush_touches() == 0 and two.volume() == 0
    assert read(two.find_blob(digest)) == b"l" * 40 and two.volume() == 40


def test_an_index_redis_lost_is_rebuilt_from_a_listing_so_everything_stays_evictable(stores: Factory) -> None:
    one = stores(max_size=1000)
    first, second = put(one, b"1" * 300), put(one, b"2" * 300)
    one.flush_touches()
    for key in one.redis.scan_iter(f"pullproxy:{one.prefix}*"):  # Redis restarted without its data
        one.redis.delete(key)
    third = put(one, b"3" * 300)  # stored before any replica noticed
    assert one.count() == 1
    stores().flush_touches()  # another replica notices and lists the bucket
    assert one.count() == 3 and one.volume() == 900
    put(one, b"4" * 300)  # over max_size: an old upload goes (times of a second), though nobody used it since
    assert [in_bucket(one, digest) for digest in (first, second)].count(False) == 1 and in_bucket(one, third)


def test_with_the_bucket_unreachable_local_copies_serve_and_the_rest_is_unavailable(
    stores: Factory, weed: SeaweedFS
) -> None:
    one = stores()
    local = put(one, b"local" * 10)
    body = b'{"local":true}'
    manifest = "sha256:" + hashlib.sha256(body).hexdigest()
    one.put_manifest(Manifest(manifest, "application/json", body))
    elsewhere = put(stores(), b"elsewhere")
    cut = BucketContentStore(  # the same replica, its bucket cut off
        open_bucket(f"http://127.0.0.1:{free_port()}", weed.bucket, "us-east-1", "k", "s"),
        open_redis(_url(one)),
        one.directory,
        1 << 30,
        1 << 30,
        prefix=one.prefix,
    )
    failures: list[Operation] = []
    cut.observe = lambda operation, seconds, failed: failures.append(operation) if failed else None
    try:
        assert read(cut.find_blob(local)) == b"local" * 10 and cut.has_blob(local)
        assert cut.find_manifest(manifest) is not None
        with pytest.raises(StoreUnavailable):
            cut.find_blob(elsewhere)
        with pytest.raises(StoreUnavailable):
            cut.remove(local)
        assert cut.presigned_url(local, datetime.timedelta(minutes=1)) is not None  # signing needs no request
        assert failures and set(failures) <= {Operation.GET, Operation.HEAD}
    finally:
        cut.close()
    assert one.has_blob(local) and one.count() == 3  # nothing was lost


def _url(store: BucketContentStore) -> str:
    kwargs = store.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


# -- presigned URLs --------------------------------------------------------------------


def test_a_presigned_url_serves_the_blob_and_ranges_of_it(stores: Factory) -> None:
    store = stores()
    digest = put(store, b"0123456789")
    url = store.presigned_url(digest, datetime.timedelta(minutes=5))
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    assert httpx.get(url).content == b"0123456789"
    ranged = httpx.get(url, headers={"Range": "bytes=3-5"})
    assert (ranged.status_code, ranged.content) == (206, b"345")
    assert store.presigned_url("sha256:" + "1" * 64, datetime.timedelta(minutes=5)) is None
