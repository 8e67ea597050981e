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
from cache.storage import ContentStore, Metadata
from cache.store import DiskContentStore
from tests.support.ports import free_port

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
