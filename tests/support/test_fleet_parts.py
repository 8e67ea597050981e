"""The fleet's real parts start, check what they should, and come back after an outage."""

from __future__ import annotations

import datetime

import httpx
import obstore
import pytest
import redis
from obstore.store import S3Store

from .redis_server import RedisServer
from .seaweed import SeaweedFS


def _bucket(weed: SeaweedFS, secret: str) -> S3Store:
    return S3Store(
        weed.bucket,
        endpoint=weed.endpoint,
        access_key_id=weed.access_key,
        secret_access_key=secret,
        region="us-east-1",
        client_options={"allow_http": True},
    )


def test_seaweedfs_checks_signatures_and_presigns_ranges() -> None:
    with SeaweedFS() as weed:
        obstore.put(_bucket(weed, weed.secret_key), "blobs/x", b"hello world")
        with pytest.raises(Exception, match=r"(?i)denied|forbidden|403|signature"):
            obstore.put(_bucket(weed, "not-the-secret"), "blobs/y", b"nope")
        url = obstore.sign(_bucket(weed, weed.secret_key), "GET", "blobs/x", datetime.timedelta(minutes=1))
        answer = httpx.get(url, headers={"Range": "bytes=6-10"})
        assert (answer.status_code, answer.content) == (206, b"world")


def test_redis_keeps_its_port_across_a_restart() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        client.set("k", "v")
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        server.start()
        assert client.ping()
        assert client.get("k") is None  # no persistence: a restart is an empty Redis
