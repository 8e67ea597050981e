"""Both hosted indexes (SQLite `Index`, `RedisIndex` on a real redis-server) behave the same: one conformance suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.hosted import redis_index
from proxy.hosted.index import HostedIndex, Index, StoredManifest
from proxy.hosted.redis_index import RedisIndex
from tests.support.redis_server import RedisServer

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
M1 = "sha256:" + "1" * 64
M2 = "sha256:" + "2" * 64


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(params=["sqlite", "redis"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HostedIndex]:
    opened: HostedIndex
    if request.param == "sqlite":
        opened = Index(tmp_path / "index.sqlite")
    else:
        server: RedisServer = request.getfixturevalue("server")
        client = redis.Redis.from_url(server.url)
        client.flushdb()
        opened = RedisIndex(client)
    yield opened
    opened.close()


def members(protocol: type) -> list[str]:
    return sorted(name for name in vars(protocol) if not name.startswith("_"))


@pytest.mark.parametrize("cls", [Index, RedisIndex])
def test_each_index_has_every_member_of_the_protocol(cls: type) -> None:
    missing = [name for name in members(HostedIndex) if not callable(getattr(cls, name, None))]
    assert missing == []


def test_every_index_is_a_hosted_index(index: HostedIndex) -> None:
    assert isinstance(index, HostedIndex)


def manifest(digest: str, body: bytes = b'{"schemaVersion":2}', kind: str | None = None) -> StoredManifest:
    return StoredManifest(digest, "application/vnd.oci.image.manifest.v1+json", body, kind)


def test_links_count_each_distinct_blob_once_and_unlink_frees_it(index: HostedIndex) -> None:
    assert index.repositories() == [] and index.repository_count() == 0
    index.link_blob("acme/a", A, 10)
    index.link_blob("acme/b", A, 10)
    index.link_blob("acme/b", B, 5)
    index.link_blob("acme/b", B, 5)  # again: nothing counts twice
    assert index.repositories() == ["acme/a", "acme/b"]
    assert index.has_repository("acme/a") and not index.has_repository("acme/c")
    assert index.repository_count() == 2
    assert index.blob_size("acme/a", A) == 10 and index.blob_size("acme/a", B) is None
    assert index.blob_volume() == 15
    assert index.linked_digests() == {A, B}
    assert index.unlink_blob("acme/a", A) and not index.unlink_blob("acme/a", A)
    assert index.blob_volume() == 15  # acme/b still links it
    assert index.unlink_blob("acme/b", A)
    assert index.blob_volume() == 5 and index.linked_digests() == {B}
    assert index.repository_sizes() == [("acme/a", 0, 0, 0), ("acme/b", 5, 0, 0)]


def test_manifests_tags_references_and_referrers(index: HostedIndex) -> None:
    index.link_blob("acme/app", A, 10)
    index.link_blob("acme/app", B, 7)
    top = manifest(M1, b'{"layers":1}')
    index.put_manifest("acme/app", top, None, [A, A], "v1")
    referrer = manifest(M2, b'{"subject":1}', kind="application/example")
    index.put_manifest("acme/app", referrer, M1, [B], None)
    index.put_manifest("acme/app", top, None, [A], "latest")  # again, by another tag: stored once
    assert index.manifest("acme/app", "v1") == top
    assert index.manifest("acme/app", M1) == top
    assert index.manifest("acme/app", "nope") is None and index.manifest("acme/other", M1) is None
    assert index.has_manifest("acme/app", M2) and not index.has_manifest("acme/app", A)
    assert index.manifest_count("acme/app") == 2
    assert index.manifest_volume() == len(top.body) + len(referrer.body)
    assert index.tags("acme/app") == ["latest", "v1"]
    assert index.tagged() == [("acme/app", "latest", M1), ("acme/app", "v1", M1)]
    assert index.referrers("acme/app", M1) == [referrer]
    assert index.referrers("acme/app", M2) == []
    assert index.repository_sizes() == [("acme/app", 17 + len(top.body) + len(referrer.body), 2, 2)]
    assert sorted(index.referenced_links()) == [("acme/app", A), ("acme/app", B)]
    assert index.delete_tag("acme/app", "latest") and not index.delete_tag("acme/app", "latest")
    assert index.delete_manifest("acme/app", M1) and not index.delete_manifest("acme/app", M1)
    assert index.tags("acme/app") == []  # its tags go with it
    assert index.manifest("acme/app", "v1") is None
    assert index.referenced_links() == [("acme/app", B)]
    assert index.unreferenced_links(time.time() + 1) == [("acme/app", A)]  # the blob stays linked until gc
    assert index.delete_manifest("acme/app", M2)
    assert index.referrers("acme/app", M1) == []
    assert index.manifest_volume() == 0 and index.manifest_count("acme/app") == 0


def test_unreferenced_links_only_older_than_the_cutoff(index: HostedIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    index.link_blob("acme/app", A, 1)
    cutoff = time.time() + 0.5
    now = time.time() + 1
    monkeypatch.setattr(time, "time", lambda: now)
    index.link_blob("acme/app", B, 1)
    assert index.unreferenced_links(cutoff) == [("acme/app", A)]


def test_needed_blob_refreshes_a_stale_link_only(index: HostedIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    index.link_blob("acme/app", A, 3)
    linked = time.time()
    assert index.needed_blob("acme/app", A, linked - 60) == 3
    assert index.unreferenced_links(linked + 0.5) == [("acme/app", A)]  # fresh: not refreshed
    later = linked + 100
    monkeypatch.setattr(time, "time", lambda: later)
    assert index.needed_blob("acme/app", A, later - 60) == 3  # stale: refreshed
    assert index.unreferenced_links(linked + 50) == []
    assert index.needed_blob("acme/app", B, 0) is None


def test_uploads_are_recorded_with_their_repository(index: HostedIndex) -> None:
    index.add_upload("u1", "acme/app", "http://127.0.0.1:1")
    index.add_upload("u2", "acme/other")
    assert index.upload_repository("u1") == "acme/app" and index.upload_repository("nope") is None
    assert sorted(upload for upload, _ in index.uploads()) == ["u1", "u2"]
    assert all(abs(started - time.time()) < 60 for _, started in index.uploads())
    index.set_upload_size("u1", 100)
    index.remove_upload("u1")
    index.set_upload_size("u1", 50)  # after it is gone: not counted
    assert index.upload_repository("u1") is None
    assert index.upload_volume() in (None, 0)


def test_redis_index_keeps_owner_and_upload_sizes(server: RedisServer) -> None:
    """What a fleet needs beyond one host's index: who stages an upload, and every upload's bytes."""
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    index = RedisIndex(client)
    try:
        index.add_upload("u1", "acme/app", "http://127.0.0.1:1")
        index.add_upload("u2", "acme/app")
        index.set_upload_size("u1", 100)
        index.set_upload_size("u2", 20)
        assert index.upload_owner("u1") == "http://127.0.0.1:1" and index.upload_owner("u2") is None
        assert index.upload_volume() == 120
        index.remove_upload("u1")
        assert index.upload_volume() == 20
    finally:
        index.close()


def test_write_lock_excludes_other_writers_and_nests(index: HostedIndex) -> None:
    inside: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with index.write():
            with index.write():  # nested: joins the outer
                inside.append("holder")
                entered.set()
                release.wait(10)
            inside.append("holder done")

    def other() -> None:
        with index.write():
            inside.append("other")

    first = threading.Thread(target=holder)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=other)
    second.start()
    time.sleep(0.3)
    assert inside == ["holder"]  # the other writer waits
    release.set()
    first.join(10)
    second.join(10)
    assert inside == ["holder", "holder done", "other"]


def test_redis_write_lock_is_renewed_while_held_and_freed_when_its_holder_dies(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_index, "LOCK_TIMEOUT", 0.6)
    monkeypatch.setattr(redis_index, "_RENEW_EVERY", 0.1)
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    index, rival = RedisIndex(client), RedisIndex(redis.Redis.from_url(server.url))
    try:
        with index.write():
            time.sleep(1.2)  # twice the timeout: still held, renewed
            assert client.exists(redis_index.PREFIX + "write")
        dead = client.lock(redis_index.PREFIX + "write", timeout=0.6)  # a holder that never renews nor releases
        assert dead.acquire(blocking=False)
        started = time.monotonic()
        with rival.write():
            pass
        assert time.monotonic() - started < 5
    finally:
        index.close()
        rival.close()


def test_a_hold_lasts_as_long_as_its_upload(index: HostedIndex) -> None:
    index.add_upload("u1", "acme/app")
    index.add_upload("u2", "acme/app")
    index.hold_blob("u1", A)
    index.hold_blob("u2", A)
    index.hold_blob("u2", B)  # the upload's latest digest replaces its earlier one
    assert index.held_digests() == {A, B}
    index.remove_upload("u2")
    assert index.held_digests() == {A}
    index.remove_upload("u1")
    assert index.held_digests() == set()


def test_redis_unreachable_is_unavailable_not_an_internal_error() -> None:
    from proxy import errors
    from tests.support.ports import free_port

    index = RedisIndex(redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, socket_timeout=1))
    try:
        for call in (lambda: index.blob_size("acme/app", A), index.repositories, lambda: index.write().__enter__()):
            with pytest.raises(errors.Unavailable, match="Redis does not answer"):
                call()
    finally:
        index.close()
