"""Peer credentials open exactly the request they were issued for, only with the fleet's secret."""

from __future__ import annotations

import hashlib
import time

import jwt
import pytest

from proxy import config
from proxy.fleet.peers import PeerCredentials, Replica, this_replica

ME = Replica("a-1-x", "http://127.0.0.1:5001")


def test_a_credential_names_its_replica_for_its_own_request_only() -> None:
    peers = PeerCredentials("s3cret", ME)
    value = peers.issue("GET", "/_pullproxy/peer/blobs/sha256:ab")
    assert peers.check(value, "GET", "/_pullproxy/peer/blobs/sha256:ab") == "a-1-x"
    assert peers.check(value, "GET", "/_pullproxy/peer/blobs/sha256:cd") is None
    assert peers.check(value, "PUT", "/_pullproxy/peer/blobs/sha256:ab") is None


def test_another_secret_or_an_expired_credential_is_refused() -> None:
    value = PeerCredentials("other", ME).issue("GET", "/p")
    assert PeerCredentials("s3cret", ME).check(value, "GET", "/p") is None
    old = jwt.encode(
        {"aud": "pullproxy-peer", "iss": "x", "iat": 1, "exp": int(time.time()) - 60, "req": "GET /p"},
        hashlib.sha256(b"pullproxy-peer\0s3cret").digest(),
        algorithm="HS256",
    )
    assert PeerCredentials("s3cret", ME).check(old, "GET", "/p") is None
    assert PeerCredentials("s3cret", ME).check(None, "GET", "/p") is None


def test_without_a_secret_peer_requests_are_off() -> None:
    peers = PeerCredentials(None, ME)
    assert not peers.enabled
    assert peers.check("anything", "GET", "/p") is None
    with pytest.raises(PermissionError):
        peers.issue("GET", "/p")


def test_the_advertised_url_defaults_to_the_listen_address() -> None:
    loaded = config.load(None, environ={"PULLPROXY_SERVER_LISTEN": "127.0.0.1:5123"})
    replica = this_replica(loaded)
    assert replica.url == "http://127.0.0.1:5123"
    assert replica.id != this_replica(loaded).id
