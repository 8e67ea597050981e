"""The disk store, the bucket store and the metadata implement cache.storage's Protocols, so each can stand in."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.bucket import BucketContentStore, open_bucket, open_redis
from cache.meta import DiskMetadata
from cache.redis_meta import RedisMetadata, connect
from cache.storage import EXPANDED, LINKED, ContentStore, Metadata
from cache.store import DiskContentStore
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).parent.parent.parent

# What mypy --strict must accept: each concrete class where its Protocol is expected.
CONFORMS = """
from pathlib import Path

import redis
from obstore.store import S3Store

from cache.bucket import BucketContentStore
from cache.meta import DiskMetadata
from cache.redis_meta import RedisMetadata, connect
from cache.storage import ContentStore, Metadata
from cache.store import DiskContentStore


def content(directory: Path) -> ContentStore:
    return DiskContentStore(directory, 1 << 20)


def bucket_content(bucket: S3Store, index: redis.Redis, directory: Path) -> ContentStore:
    return BucketContentStore(bucket, index, directory, 1 << 20, 1 << 20)


def metadata(directory: Path) -> Metadata:
    return DiskMetadata(directory)


def shared_metadata(url: str) -> Metadata:
    return RedisMetadata(connect(url))
"""


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[DiskContentStore, DiskMetadata]]:
    store, meta = DiskContentStore(tmp_path, 1 << 20), DiskMetadata(tmp_path)
    yield store, meta
    store.close()
    meta.close()


def members(protocol: type) -> list[str]:
    """The names a Protocol declares: its methods and properties, and its annotated attributes."""
    return sorted({name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__))


def test_each_concrete_class_has_every_member_of_its_protocol(opened: tuple[DiskContentStore, DiskMetadata]) -> None:
    store, meta = opened
    assert isinstance(store, ContentStore) and isinstance(meta, Metadata)
    assert not isinstance(meta, ContentStore) and not isinstance(store, Metadata)  # the check can fail


def test_the_bucket_store_has_every_member_of_the_content_protocol(tmp_path: Path) -> None:
    """Built on endpoints nothing listens on: construction sends no request."""
    port = free_port()
    bucket = open_bucket(f"http://127.0.0.1:{port}", "bucket", "us-east-1", "key", "secret")
    store = BucketContentStore(bucket, open_redis(f"redis://127.0.0.1:{port}/0"), tmp_path, 1 << 20, 1 << 20)
    try:
        assert isinstance(store, ContentStore) and not isinstance(store, Metadata)
    finally:
        store.close()


def test_redis_metadata_is_metadata() -> None:
    meta = RedisMetadata(connect("redis://127.0.0.1:1/0"))  # no connection is made before a call
    assert isinstance(meta, Metadata) and not isinstance(meta, ContentStore)
    meta.close()


@pytest.mark.parametrize(
    ("protocol", "concrete"),
    [
        (ContentStore, DiskContentStore),
        (ContentStore, BucketContentStore),
        (Metadata, DiskMetadata),
        (Metadata, RedisMetadata),
    ],
)
def test_each_method_takes_the_parameters_its_protocol_names(protocol: type, concrete: type) -> None:
    for name in members(protocol):
        declared = getattr(protocol, name, None)
        if not inspect.isfunction(declared):
            continue  # an attribute or property: present, as the isinstance check saw
        expected = list(inspect.signature(declared).parameters)
        assert list(inspect.signature(getattr(concrete, name)).parameters) == expected, name


def test_mypy_strict_accepts_each_concrete_class_as_its_protocol(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy"), "-c", CONFORMS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- behaviour: what every `Metadata` answers the same way -------------------------------

D1, D2 = f"sha256:{1:064x}", f"sha256:{2:064x}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(params=["disk", "redis"])
def metadata(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Metadata]:
    """Each implementation, empty."""
    meta: Metadata
    if request.param == "disk":
        meta = DiskMetadata(tmp_path)
    else:
        url = request.getfixturevalue("redis_url")
        connect(url).flushdb()
        meta = RedisMetadata(connect(url))
    yield meta
    meta.close()


def test_every_metadata_records_tags_lists_and_repositories_alike(metadata: Metadata) -> None:
    assert metadata.find_tag("up", "team/app", "1") is None and metadata.cached_tag("up", "team/app", "1") is None
    record = metadata.set_tag("up", "team/app", "1", D1)
    assert record.digest == D1
    assert metadata.cached_tag("up", "team/app", "1") == record == metadata.find_tag("up", "team/app", "1")
    metadata.set_tag("up", "team/app", "0", D2)
    metadata.set_tag("other", "team/app", "1", D2)
    assert metadata.known_tags("up", "team/app") == ["0", "1"]
    assert metadata.repositories() == [("other", "team/app"), ("up", "team/app")]
    metadata.remove_tag("up", "team/app", "1")
    metadata.remove_tag("up", "team/app", "0")
    assert metadata.find_tag("up", "team/app", "1") is None and metadata.cached_tag("up", "team/app", "1") is None
    assert metadata.known_tags("up", "team/app") == []
    assert metadata.repositories() == [("other", "team/app")]


def test_every_metadata_raises_links_and_never_lowers_them(metadata: Metadata) -> None:
    assert metadata.find_link("up", "team/app", D1) == 0 and metadata.cached_link("up", "team/app", D1) == 0
    metadata.add_links("up", "team/app", {D1: EXPANDED, D2: LINKED})
    metadata.add_links("up", "team/app", {D1: LINKED})
    assert metadata.cached_link("up", "team/app", D1) == EXPANDED
    assert (metadata.find_link("up", "team/app", D1), metadata.find_link("up", "team/app", D2)) == (EXPANDED, LINKED)
    assert metadata.find_link("up", "other/app", D1) == 0


def test_every_metadata_tells_no_referrers_from_unknown_ones(metadata: Metadata) -> None:
    assert metadata.referrers("up", "team/app", D1) is None
    metadata.set_referrers("up", "team/app", D1, b'{"manifests":[]}')
    metadata.set_referrers("up", "team/app", D2, None)
    stored, none = metadata.referrers("up", "team/app", D1), metadata.referrers("up", "team/app", D2)
    assert stored is not None and stored.body == b'{"manifests":[]}'
    assert none is not None and none.body is None
    metadata.remember_no_referrers("up", "team/app", D1)
    remembered = metadata.referrers("up", "team/app", D1)
    assert remembered is not None and remembered.body is None


def test_every_metadata_answers_a_claim_to_check_a_tag(metadata: Metadata) -> None:
    assert metadata.claim_tag_check("up", "team/app", "1", 100.0, 1.0) is True  # the first one always gets it
