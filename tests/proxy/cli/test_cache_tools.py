"""`pullproxy cache ls | du | rm | verify` next to a running mirror."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from cache.mediatypes import OCI_MANIFEST
from proxy.config import Hosted
from proxy.hosted.repository import HostedRepositories
from tests.proxy.hosted.test_gc import manifest_of, upload
from tests.support.clients import skopeo_copy
from tests.support.commands import blob_file, pullproxy
from tests.support.images import PushedImage
from tests.support.proxy import REPO_ROOT, Proxy
from tests.support.registry import Registry


def test_verify_removes_a_blob_corrupted_on_disk_and_the_mirror_fetches_it_again(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    alpine: PushedImage = upstream.images["alpine"]  # type: ignore[attr-defined]
    proxy = proxy_factory(upstream_url=upstream.url)
    skopeo_copy(f"docker://{proxy.host}/{alpine.repo}:{alpine.tag}", f"dir:{tmp_path / 'first'}")
    assert pullproxy(proxy, "cache", "verify").returncode == 0

    layer = alpine.blobs[-1]
    path = blob_file(proxy, layer.digest)
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    found = pullproxy(proxy, "cache", "verify", check=False)
    assert found.returncode == 1 and f"removed corrupt {layer.digest}" in found.stdout
    assert pullproxy(proxy, "cache", "verify").returncode == 0

    fetched = httpx.get(f"{proxy.url}/v2/{alpine.repo}/blobs/{layer.digest}", timeout=10)
    assert fetched.status_code == 200 and fetched.content == data


def test_ls_du_and_rm_keep_content_other_tags_share(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    tagged: PushedImage = upstream.images["tagged"]  # type: ignore[attr-defined]
    alpine: PushedImage = upstream.images["alpine_319"]  # type: ignore[attr-defined]
    proxy = proxy_factory(upstream_url=upstream.url)
    for ref in (f"{tagged.repo}:v1", f"{tagged.repo}:v2", f"{alpine.repo}:{alpine.tag}"):
        skopeo_copy(f"docker://{proxy.host}/{ref}", f"dir:{tmp_path / ref.replace('/', '-')}")

    listing = pullproxy(proxy, "cache", "ls").stdout
    for name in ("docker.io/acme/tagged:v1", "docker.io/acme/tagged:v2", "docker.io/library/alpine:3.19"):
        assert name in listing
    assert "blobs" in pullproxy(proxy, "cache", "du").stdout

    # v1 and v2 are one image: removing v1 must keep what v2 needs.
    assert "freed 0 B" in pullproxy(proxy, "cache", "rm", "docker.io/acme/tagged:v1").stdout
    pullproxy(proxy, "cache", "rm", "alpine:3.19")  # a Docker Hub short name, as clients write it
    listing = pullproxy(proxy, "cache", "ls").stdout
    assert "acme/tagged:v1" not in listing and "alpine:3.19" not in listing and "acme/tagged:v2" in listing
    assert pullproxy(proxy, "cache", "rm", "alpine:3.19", check=False).returncode != 0

    upstream.stop()
    try:
        skopeo_copy(f"docker://{proxy.host}/{tagged.repo}:v2", f"dir:{tmp_path / 'kept'}")
        gone = httpx.get(f"{proxy.url}/v2/{alpine.repo}/blobs/{alpine.blobs[-1].digest}", timeout=10)
        assert gone.status_code == 503  # removed from disk: the mirror would have to fetch it
    finally:
        upstream.start()


def _hosted_cache(tmp_path: Path) -> tuple[Path, HostedRepositories]:
    """A cache directory with `[hosted]` and no server: its config file and its hosted store (close it)."""
    config = tmp_path / "pullproxy.toml"
    config.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n[hosted]\nrepositories = ["acme/**"]\n')
    (tmp_path / "cache").mkdir(exist_ok=True)
    return config, HostedRepositories(Hosted(repositories=("acme/**",)), tmp_path / "cache" / "hosted")


def _command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "proxy", *args, "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT)


def test_verify_reports_corrupt_hosted_content_and_keeps_it(tmp_path: Path) -> None:
    config, hosted = _hosted_cache(tmp_path)
    try:
        good = upload(hosted, "acme/app", b"good layer" * 100)
        flipped = upload(hosted, "acme/app", b"flipped layer" * 100)
        assert hosted.mount("acme/other", "acme/app", flipped) is not None
        short = upload(hosted, "acme/app", b"truncated layer" * 100)
        upload(hosted, "acme/app", b"{}")
        pushed = hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"good layer" * 100))
        for digest, damage in ((flipped, "flip"), (short, "truncate")):
            path = Path(hosted.content.stored_path(digest) or "")
            data = path.read_bytes()
            path.write_bytes(data[:-1] if damage == "truncate" else bytes([data[0] ^ 0xFF]) + data[1:])
    finally:
        hosted.close()
    with sqlite3.connect(tmp_path / "cache" / "hosted" / "index.sqlite") as db:
        db.execute("UPDATE manifests SET body = CAST(body || ' ' AS BLOB)")
    for _ in range(2):  # reported again: nothing was silently deleted
        found = _command(config, "cache", "verify")
        assert found.returncode == 1, found.stdout + found.stderr
        out = found.stdout
        assert out, found.stderr
        assert f"corrupt hosted blob {flipped} in acme/app, acme/other: kept" in out
        assert f"corrupt hosted blob {short} in acme/app: kept" in out
        assert f"corrupt hosted manifest {pushed.digest} in acme/app: kept" in out
        assert f"DELETE /v2/<repository>/blobs/{flipped}" in out and "pullproxy gc" in out
        assert good not in out and "removed corrupt" not in out
    _, hosted = _hosted_cache(tmp_path)
    try:
        for digest in (flipped, short):
            assert hosted.content.stored_path(digest) is not None
            assert hosted.blob_size("acme/app", digest) is not None
        assert hosted.manifest("acme/app", "v1") is not None
    finally:
        hosted.close()


def test_verify_passes_sound_hosted_content(tmp_path: Path) -> None:
    config, hosted = _hosted_cache(tmp_path)
    try:
        upload(hosted, "acme/app", b"{}")
        upload(hosted, "acme/app", b"good layer")
        hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"good layer"))
    finally:
        hosted.close()
    found = _command(config, "cache", "verify")
    assert found.returncode == 0, found.stdout + found.stderr
    assert "corrupt" not in found.stdout


def test_rm_refuses_hosted_content_and_points_at_the_delete_api(tmp_path: Path) -> None:
    config, hosted = _hosted_cache(tmp_path)
    try:
        upload(hosted, "acme/app", b"{}")
        upload(hosted, "acme/app", b"layer")
        hosted.put_manifest("acme/app", "v1", OCI_MANIFEST, manifest_of(b"layer"))
    finally:
        hosted.close()
    refused = _command(config, "cache", "rm", "acme/app:v1")
    assert refused.returncode != 0
    assert "acme/app is a hosted repository" in refused.stderr
    assert "DELETE /v2/acme/app/manifests/" in refused.stderr and "pullproxy gc" in refused.stderr
    _, hosted = _hosted_cache(tmp_path)
    try:
        assert hosted.manifest("acme/app", "v1") is not None
    finally:
        hosted.close()
