"""What referrers requests leave behind is bounded: anyone may ask about any digest."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import diskcache

from cache.meta import DiskMetadata
from tests.support.inprocess import OCI_INDEX, OCI_MANIFEST, MemoryRegistry, mirror_client

EMPTY = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def stored_referrers(directory: Path) -> int:
    """Referrers records on disk, wherever the cache keeps them."""
    count = 0
    for name in ("meta", "referrers"):
        if (directory / name).exists():
            with diskcache.Cache(str(directory / name)) as db:
                count += sum(1 for key in db if name == "referrers" or key[0] == "referrers")
    return count


def test_referrers_of_made_up_digests_store_nothing_and_are_remembered_in_memory(tmp_path: Path) -> None:
    upstream = MemoryRegistry()
    upstream.add_image("team/app", "1", b"layer")
    made_up = [f"sha256:{secrets.token_hex(32)}" for _ in range(200)]
    with mirror_client(tmp_path, upstream) as client:
        for digest in made_up:
            response = client.get(f"/v2/team/app/referrers/{digest}")
            assert response.status_code == 200
            assert response.json() == EMPTY
        asked = len(upstream.requests)
        assert client.get(f"/v2/team/app/referrers/{made_up[-1]}").json() == EMPTY
        assert len(upstream.requests) == asked  # answered from memory within tag_ttl
    assert stored_referrers(tmp_path) == 0


def test_referrers_indexes_are_stored_and_survive_a_restart_with_the_upstream_gone(tmp_path: Path) -> None:
    upstream = MemoryRegistry()
    subject, _, layer = upstream.add_image("team/app", "1", b"layer")
    index = {**EMPTY, "manifests": [{"mediaType": OCI_MANIFEST, "digest": layer, "size": 5, "artifactType": "x"}]}
    upstream.referrers[("team/app", subject)] = json.dumps(index).encode()
    with mirror_client(tmp_path, upstream) as client:
        assert client.get(f"/v2/team/app/referrers/{subject}").json() == index
    assert stored_referrers(tmp_path) == 1
    with mirror_client(tmp_path, MemoryRegistry(), offline=True) as client:
        assert client.get(f"/v2/team/app/referrers/{subject}").json() == index


def test_no_referrers_of_a_pulled_image_is_stored_for_offline_clients(tmp_path: Path) -> None:
    upstream = MemoryRegistry()
    subject, _, _ = upstream.add_image("team/app", "1", b"layer")
    with mirror_client(tmp_path, upstream) as client:
        client.get("/v2/team/app/manifests/1").raise_for_status()  # the repository holds it now
        assert client.get(f"/v2/team/app/referrers/{subject}").json() == EMPTY
    assert stored_referrers(tmp_path) == 1
    with mirror_client(tmp_path, MemoryRegistry(), offline=True) as client:
        response = client.get(f"/v2/team/app/referrers/{subject}")
        assert response.status_code == 200
        assert response.json() == EMPTY
        assert client.get(f"/v2/team/app/referrers/sha256:{secrets.token_hex(32)}").status_code == 503


def test_stored_referrers_indexes_are_bounded_the_oldest_going_first(tmp_path: Path) -> None:
    meta = DiskMetadata(tmp_path, referrers_size=256 << 10)
    try:
        index = json.dumps({**EMPTY, "annotations": {"pad": "x" * 1000}}).encode()
        for number in range(2000):  # about 2 MiB of indexes
            meta.set_referrers("up", "team/app", f"sha256:{number:064x}", index)
        assert meta.referrers("up", "team/app", f"sha256:{1999:064x}") is not None
        assert meta.referrers("up", "team/app", f"sha256:{0:064x}") is None
    finally:
        meta.close()
    assert 0 < stored_referrers(tmp_path) < 400


def test_none_in_memory_replaces_an_index_stored_before(tmp_path: Path) -> None:
    meta = DiskMetadata(tmp_path)
    try:
        meta.set_referrers("up", "team/app", "sha256:" + "a" * 64, b"{}")
        meta.remember_no_referrers("up", "team/app", "sha256:" + "a" * 64)
        found = meta.referrers("up", "team/app", "sha256:" + "a" * 64)
        assert found is not None and found[1] is None
    finally:
        meta.close()
    assert stored_referrers(tmp_path) == 0
