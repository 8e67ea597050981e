"""Moving images: export OCI layout archives from one mirror, import them into an air-gapped one."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from cache import digests
from tests.support.clients import read_dir_image, skopeo_copy
from tests.support.commands import pullproxy
from tests.support.images import PushedImage
from tests.support.proxy import Proxy
from tests.support.registry import Registry

UNREACHABLE = [{"name": "docker.io", "url": "http://127.0.0.1:1", "default": True}]


def assert_same(folder: Path, manifest: bytes, blobs: list[str]) -> None:
    files = read_dir_image(folder)
    assert files["manifest.json"] == manifest
    for digest in blobs:
        assert digests.matches(digest, files[digest.split(":")[1]])


def test_export_then_import_into_a_mirror_without_upstream_serves_byte_for_byte(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    alpine, multi, docker = images["alpine"], images["multi"], images["docker"]
    source = proxy_factory(upstream_url=upstream.url, start=False)  # export needs no server, only the cache
    archive = tmp_path / "images.tar"
    refs = [f"docker.io/{alpine.repo}:{alpine.tag}", f"{multi.repo}:{multi.tag}", f"{docker.repo}:{docker.tag}"]
    pullproxy(source, "export", "--output", str(archive), *refs)

    with tarfile.open(archive) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert names == ["docker.io/library/alpine:latest", "docker.io/acme/multi:latest", "docker.io/acme/docker:latest"]
    skopeo_copy(f"oci-archive:{archive}:docker.io/library/alpine:latest", f"dir:{tmp_path / 'from-archive'}")
    assert_same(tmp_path / "from-archive", alpine.manifest, [b.digest for b in alpine.blobs])

    air_gapped = proxy_factory({"upstream": UNREACHABLE})
    pullproxy(air_gapped, "import", str(archive))
    for image in (alpine, docker):
        for reference in (f":{image.tag}", f"@{image.digest}"):
            folder = tmp_path / f"{image.repo.replace('/', '-')}{reference[0]}"
            skopeo_copy(f"docker://{air_gapped.host}/{image.repo}{reference}", f"dir:{folder}")
            assert_same(folder, image.manifest, [b.digest for b in image.blobs])
    skopeo_copy(f"docker://{air_gapped.host}/{multi.repo}:{multi.tag}", f"dir:{tmp_path / 'multi'}", all=True)
    assert_same(tmp_path / "multi", multi.manifest, [b.digest for b in multi.all_blobs()])


def test_import_of_a_skopeo_archive_named_by_tag_needs_image_and_verifies_every_digest(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    alpine: PushedImage = upstream.images["alpine_319"]  # type: ignore[attr-defined]
    archive = tmp_path / "skopeo.tar"
    skopeo_copy(f"docker://{upstream.host}/{alpine.repo}:{alpine.tag}", f"oci-archive:{archive}:{alpine.tag}")
    mirror = proxy_factory({"upstream": UNREACHABLE, "cache": {"offline": True}})

    refused = pullproxy(mirror, "import", str(archive), check=False)
    assert refused.returncode != 0 and "--image" in refused.stderr

    corrupt = tmp_path / "corrupt.tar"
    layer = alpine.blobs[-1].digest
    with tarfile.open(archive) as tar, tarfile.open(corrupt, "w") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name.endswith(layer.split(":")[1]):
                data = bytes([data[0] ^ 1]) + data[1:]
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    failed = pullproxy(mirror, "import", str(corrupt), "--image", "docker.io/acme/imported", check=False)
    assert failed.returncode != 0 and f"blob {layer}" in failed.stderr

    pullproxy(mirror, "import", str(archive), "--image", "docker.io/acme/imported")
    skopeo_copy(f"docker://{mirror.host}/acme/imported:{alpine.tag}", f"dir:{tmp_path / 'pulled'}")
    assert_same(tmp_path / "pulled", alpine.manifest, [b.digest for b in alpine.blobs])


def test_export_into_a_missing_folder_is_one_clear_line(tmp_path: Path) -> None:
    mirror = Proxy(upstream_url="http://127.0.0.1:1", workdir=tmp_path / "mirror", start=False)
    target = tmp_path / "nowhere" / "x.tar"
    done = pullproxy(mirror, "export", "--output", str(target), "alpine", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"pullproxy: {target}: folder {target.parent} does not exist"]


def test_export_to_a_folder_names_the_folder_before_fetching_anything(tmp_path: Path) -> None:
    mirror = Proxy(upstream_url="http://127.0.0.1:1", workdir=tmp_path / "mirror", start=False)
    target = tmp_path / "out"
    target.mkdir()
    done = pullproxy(mirror, "export", "--output", str(target), "alpine", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"pullproxy: {target}: is a folder; name the archive file to write"]
    assert list(target.iterdir()) == []


def test_export_never_writes_through_a_file_planted_beside_its_output(tmp_path: Path) -> None:
    mirror = Proxy(upstream_url="http://127.0.0.1:1", workdir=tmp_path / "mirror", start=False)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out / "x.tar.partial").symlink_to(victim)  # the name the writer used to stream into
    done = pullproxy(mirror, "export", "--output", str(out / "x.tar"), "alpine", check=False)
    assert done.returncode == 1  # the upstream is unreachable
    assert victim.read_bytes() == b"precious"
    assert [p.name for p in out.iterdir()] == ["x.tar.partial"]  # nothing of its own left behind


def test_export_refuses_an_existing_output_unless_forced(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    alpine: PushedImage = upstream.images["alpine"]  # type: ignore[attr-defined]
    source = proxy_factory(upstream_url=upstream.url, start=False)
    archive = tmp_path / "out" / "images.tar"
    archive.parent.mkdir()
    archive.write_bytes(b"an older export")
    ref = f"{alpine.repo}:{alpine.tag}"
    refused = pullproxy(source, "export", "--output", str(archive), ref, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [f"pullproxy: {archive}: already exists; --force replaces it"]
    assert archive.read_bytes() == b"an older export"

    pullproxy(source, "export", "--output", str(archive), "--force", ref)
    skopeo_copy(f"oci-archive:{archive}:docker.io/{ref}", f"dir:{tmp_path / 'copied'}")
    assert_same(tmp_path / "copied", alpine.manifest, [b.digest for b in alpine.blobs])
    assert [p.name for p in archive.parent.iterdir()] == ["images.tar"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert archive.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not mkstemp's 0600


def test_import_of_an_archive_whose_index_json_is_not_an_index_fails_saying_so(tmp_path: Path) -> None:
    mirror = Proxy(upstream_url="http://127.0.0.1:1", workdir=tmp_path / "mirror", start=False)
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", b'{"manifests": 1}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    done = pullproxy(mirror, "import", str(archive), check=False)
    assert done.returncode == 1
    expected = f'pullproxy: {archive}: index.json is not an OCI image index: no "manifests" list'
    assert done.stderr.strip().splitlines() == [expected]
