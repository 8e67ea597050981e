"""`pullproxy export` and `import` of hosted images, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from cache.mediatypes import OCI_MANIFEST
from proxy.config import Hosted
from proxy.hosted.repository import HostedRepositories
from tests.proxy.hosted.test_gc import manifest_of, sha, upload
from tests.support.proxy import REPO_ROOT

LAYER = b"hosted layer" * 5000


def configured(directory: Path) -> Path:
    config = directory / "pullproxy.toml"
    config.write_text(
        f'[cache]\ndir = "{directory / "cache"}"\n'
        '[[upstream]]\nname = "docker.io"\nurl = "http://127.0.0.1:1"\ndefault = true\n'  # never asked
        '[hosted]\nrepositories = ["acme/**"]\n'
    )
    return config


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "proxy", *args, "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def opened(directory: Path) -> HostedRepositories:
    return HostedRepositories(Hosted(repositories=("acme/**",)), directory / "cache" / "hosted")


def test_export_of_a_hosted_image_then_import_into_another_mirrors_hosted_repository(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    store = opened(source)
    upload(store, "acme/app", b"{}")
    upload(store, "acme/app", LAYER)
    body = manifest_of(LAYER)
    store.put_manifest("acme/app", "1", OCI_MANIFEST, body)
    store.close()

    archive = tmp_path / "f.tar"
    exported = run(configured(source), "export", "-o", str(archive), "acme/app:1")
    assert exported.returncode == 0, exported.stderr
    with tarfile.open(archive) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert tar.extractfile(f"blobs/sha256/{sha(LAYER)[7:]}").read() == LAYER  # type: ignore[union-attr]
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["acme/app:1"]

    config = configured(target)
    imported = run(config, "import", str(archive))
    assert imported.returncode == 0, imported.stderr
    # an archive naming its image by tag only, as skopeo writes it, goes where --image says
    retagged = tmp_path / "retagged.tar"
    copy = ["skopeo", "copy", "-q", f"oci-archive:{archive}:acme/app:1", f"oci-archive:{retagged}:2"]
    subprocess.run(copy, check=True, timeout=120, capture_output=True)
    imported = run(config, "import", "--image", "acme/copy", str(retagged))
    assert imported.returncode == 0, imported.stderr

    store = opened(target)
    try:
        for repo, tag in (("acme/app", "1"), ("acme/copy", "2")):
            manifest = store.manifest(repo, tag)
            assert manifest is not None and manifest.body == body, repo
            blob = store.blob_file(repo, sha(LAYER))
            assert blob is not None and Path(blob.path).read_bytes() == LAYER
        assert store.content.find_blob(sha(LAYER)) is not None  # stored once for both
    finally:
        store.close()
    listed = run(config, "cache", "ls").stdout.splitlines()
    assert any(line.startswith("acme/copy:2 ") and line.endswith("hosted") for line in listed), listed


def test_export_of_a_hosted_tag_that_does_not_exist_says_so(tmp_path: Path) -> None:
    opened(tmp_path).close()
    archive = tmp_path / "f.tar"
    failed = run(configured(tmp_path), "export", "-o", str(archive), "acme/app:nope")
    assert failed.returncode != 0
    assert "acme/app" in failed.stderr and "nope" in failed.stderr, failed.stderr
    assert not archive.exists()


def test_import_into_a_hosted_repository_respects_its_quota(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    store = opened(source)
    upload(store, "acme/app", b"{}")
    upload(store, "acme/app", LAYER)
    store.put_manifest("acme/app", "1", OCI_MANIFEST, manifest_of(LAYER))
    store.close()
    archive = tmp_path / "f.tar"
    assert run(configured(source), "export", "-o", str(archive), "acme/app:1").returncode == 0
    config = configured(tmp_path)
    config.write_text(config.read_text() + 'max_size = "10KiB"\n')
    failed = run(config, "import", str(archive))
    assert failed.returncode != 0
    assert "max_size" in failed.stderr, failed.stderr
    store = opened(tmp_path)
    try:
        assert store.manifest("acme/app", "1") is None
        assert store.index.uploads() == []  # nothing left half-imported
    finally:
        store.close()
