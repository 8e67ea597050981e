"""Real clients pushing into hosted repositories, and pulling back out byte for byte."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_clients import assert_same_image
from tests.support.auth import user_entry
from tests.support.clients import CommandError, Containerd, read_dir_image, run, skopeo_copy
from tests.support.images import PushedImage
from tests.support.proxy import Proxy
from tests.support.registry import Registry

HOSTED = {"hosted": {"repositories": ["acme/**", "charts/*"], "upload_ttl": "1h"}}
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_skopeo_copies_into_hosted_repositories_and_back_out_byte_for_byte_across_kill_9(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    images: dict[str, PushedImage] = upstream.images  # type: ignore[attr-defined]
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    kinds = {"alpine": False, "multi": True, "docker": False, "helm": False}
    for kind, all_platforms in kinds.items():
        image = images[kind]
        skopeo_copy(
            f"docker://{upstream.host}/{image.repo}:{image.tag}",
            f"docker://{proxy.host}/acme/{kind}:{image.tag}",
            all=all_platforms,
            timeout=300,
        )
    assert proxy.pid is not None
    os.kill(proxy.pid, signal.SIGKILL)  # every acknowledged push must survive
    proxy.stop()
    proxy.start()
    for kind, all_platforms in kinds.items():
        image = images[kind]
        folder = tmp_path / kind
        skopeo_copy(f"docker://{proxy.host}/acme/{kind}:{image.tag}", f"dir:{folder}", all=all_platforms, timeout=300)
        assert_same_image(folder, image, all_platforms)
    catalog = httpx.get(f"{proxy.url}/v2/_catalog").json()["repositories"]
    assert {f"acme/{kind}" for kind in kinds} <= set(catalog)
    assert "PUT" in proxy.log_text() and "/v2/acme/multi/manifests/" in proxy.log_text()


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_docker_daemon_push_sequence_as_raw_http(proxy_factory: Callable[..., Proxy], upstream: Registry) -> None:
    """dockerd 20.10: ping, HEAD, POST, one chunked PATCH without Content-Type, empty PUT ?digest=, HEAD;
    the manifest as Docker schema 2 by tag; in another repository a mount from the first."""
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = os.urandom(3 << 20)
    headers = {"User-Agent": "docker/20.10.24 go/go1.19.7", "Connection": "close"}
    with httpx.Client(base_url=proxy.url, headers=headers, timeout=60) as client:
        assert client.get("/v2/").status_code == 200
        for blob in (layer, config):
            assert client.head(f"/v2/acme/docker/blobs/{sha(blob)}").status_code == 404
            started = client.post("/v2/acme/docker/blobs/uploads/")
            assert started.status_code == 202
            patched = client.patch(started.headers["Location"], content=_chunks(blob, 65536))
            assert patched.status_code == 202
            assert patched.headers["Range"] == f"0-{len(blob) - 1}"
            location = patched.headers["Location"]
            done = client.put(location, params={"digest": sha(blob)})
            assert done.status_code == 201
            assert done.headers["Docker-Content-Digest"] == sha(blob)
            assert client.head(f"/v2/acme/docker/blobs/{sha(blob)}").headers["Content-Length"] == str(len(blob))
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_V2,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config),
                    "digest": sha(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(layer),
                        "digest": sha(layer),
                    }
                ],
            }
        ).encode()
        pushed = client.put("/v2/acme/docker/manifests/latest", content=manifest, headers={"Content-Type": DOCKER_V2})
        assert pushed.status_code == 201
        assert pushed.headers["Docker-Content-Digest"] == sha(manifest)
        for blob in (layer, config):
            mounted = client.post("/v2/acme/copy/blobs/uploads/", params={"from": "acme/docker", "mount": sha(blob)})
            assert mounted.status_code == 201
        copied = client.put("/v2/acme/copy/manifests/latest", content=manifest, headers={"Content-Type": DOCKER_V2})
        assert copied.status_code == 201
        pulled = client.get("/v2/acme/copy/manifests/latest", headers={"Accept": DOCKER_V2})
        assert (pulled.content, pulled.headers["Content-Type"]) == (manifest, DOCKER_V2)
        assert client.get(f"/v2/acme/copy/blobs/{sha(layer)}").content == layer


def test_oras_style_chunked_upload_with_content_range(proxy_factory: Callable[..., Proxy], upstream: Registry) -> None:
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    data = os.urandom(1000)
    with httpx.Client(base_url=proxy.url, timeout=60) as client:
        location = client.post("/v2/charts/app/blobs/uploads/", headers={"Content-Type": "application/octet-stream"})
        url = location.headers["Location"]
        for start in range(0, len(data), 64):
            piece = data[start : start + 64]
            answer = client.patch(url, content=piece, headers={"Content-Range": f"{start}-{start + len(piece) - 1}"})
            assert answer.status_code == 202, answer.text
            url = answer.headers["Location"]
        assert client.put(url, params={"digest": sha(data)}).status_code == 201
        assert client.get(f"/v2/charts/app/blobs/{sha(data)}").content == data


def test_containerd_ctr_pushes_a_pulled_image_into_a_hosted_repository(
    upstream: Registry, proxy_factory: Callable[..., Proxy], containerd: Containerd
) -> None:
    image: PushedImage = upstream.images["alpine"]  # type: ignore[attr-defined]
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    source = f"{upstream.host}/{image.repo}:{image.tag}"
    containerd.pull(source, plain_http=True, unpack=False)
    containerd.ctr("images", "push", "--plain-http", f"{proxy.host}/acme/ctr:{image.tag}", source, timeout=120)
    pulled = httpx.get(f"{proxy.url}/v2/acme/ctr/manifests/{image.tag}", headers={"Accept": image.media_type})
    assert pulled.status_code == 200
    assert pulled.content == image.manifest
    for blob in image.blobs:
        assert (
            hashlib.sha256(httpx.get(f"{proxy.url}/v2/acme/ctr/blobs/{blob.digest}").content).hexdigest()
            == (blob.digest.split(":")[1])
        )


def test_oras_pushes_and_pulls_an_artifact_whole_and_chunked(
    proxy_factory: Callable[..., Proxy], upstream: Registry, tmp_path: Path
) -> None:
    """Python `oras` (PyPI): a file artifact by tag, once in one PUT and once in 64-byte PATCHes."""
    from oras.provider import Registry as OrasRegistry

    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    artifact = tmp_path / "chart.tgz"
    artifact.write_bytes(os.urandom(1000))
    client = OrasRegistry(hostname=proxy.host, insecure=True, auth_backend="basic")
    for repo, chunked in (("charts/whole", False), ("charts/chunked", True)):
        cwd = os.getcwd()
        os.chdir(tmp_path)  # oras names files by their path relative to where it runs
        try:
            pushed = client.push(
                target=f"{proxy.host}/{repo}:0.1.0", files=["chart.tgz"], do_chunked=chunked, chunk_size=64
            )
        finally:
            os.chdir(cwd)
        assert pushed.status_code == 201
        out = tmp_path / repo.replace("/", "-")
        files = client.pull(target=f"{proxy.host}/{repo}:0.1.0", outdir=str(out))
        assert [Path(f).read_bytes() for f in files] == [artifact.read_bytes()]
    log = proxy.log_text()
    assert "PATCH" in log and "/v2/charts/chunked/blobs/uploads/" in log


def test_an_artifact_pushed_with_oras_is_copied_out_by_skopeo_byte_for_byte(
    proxy_factory: Callable[..., Proxy], upstream: Registry, tmp_path: Path
) -> None:
    """Python `oras` pushes a file artifact; skopeo (containers/image) copies it out to `dir:` and `oci:`."""
    from oras.provider import Registry as OrasRegistry

    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    content = os.urandom(50_000)
    (tmp_path / "chart.tgz").write_bytes(content)
    client = OrasRegistry(hostname=proxy.host, insecure=True, auth_backend="basic")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # oras names files by their path relative to where it runs
    try:
        pushed = client.push(target=f"{proxy.host}/acme/artifact:0.1.0", files=["chart.tgz"])
    finally:
        os.chdir(cwd)
    assert pushed.status_code == 201
    digest = pushed.headers["Docker-Content-Digest"]
    served = httpx.get(
        f"{proxy.url}/v2/acme/artifact/manifests/0.1.0",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    assert sha(served.content) == digest
    manifest = json.loads(served.content)
    config = httpx.get(f"{proxy.url}/v2/acme/artifact/blobs/{manifest['config']['digest']}", timeout=30).content

    folder = tmp_path / "dir"
    skopeo_copy(f"docker://{proxy.host}/acme/artifact:0.1.0", f"dir:{folder}")
    files = read_dir_image(folder)
    assert files["manifest.json"] == served.content  # the manifest as oras pushed it, unchanged
    (layer,) = manifest["layers"]
    assert layer["annotations"]["org.opencontainers.image.title"] == "chart.tgz"
    assert files[layer["digest"].split(":")[1]] == content
    assert files[manifest["config"]["digest"].split(":")[1]] == config

    layout = tmp_path / "layout"
    skopeo_copy(f"docker://{proxy.host}/acme/artifact:0.1.0", f"oci:{layout}:0.1.0")
    index = json.loads((layout / "index.json").read_bytes())
    assert [entry["digest"] for entry in index["manifests"]] == [digest]
    blobs = layout / "blobs" / "sha256"
    assert (blobs / digest.split(":")[1]).read_bytes() == served.content
    assert (blobs / layer["digest"].split(":")[1]).read_bytes() == content


def test_podman_pushes_into_a_hosted_repository(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """podman (containers/image) with its own storage: pull from the upstream, push to the mirror, read back."""
    image: PushedImage = upstream.images["alpine"]  # type: ignore[attr-defined]
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    runroot = Path(tempfile.mkdtemp(prefix="pp-podman-"))  # podman wants a runroot under 50 characters
    podman = [
        "podman",
        "--root",
        str(tmp_path / "root"),
        "--runroot",
        str(runroot),
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
    ]
    source = f"{upstream.host}/{image.repo}:{image.tag}"
    try:
        _podman_push(podman, source, proxy, image, tmp_path)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def _podman_push(podman: list[str], source: str, proxy: Proxy, image: PushedImage, tmp_path: Path) -> None:
    run([*podman, "pull", "--tls-verify=false", f"docker://{source}"], timeout=120)
    run([*podman, "push", "--tls-verify=false", source, f"docker://{proxy.host}/acme/podman:{image.tag}"], timeout=120)
    folder = tmp_path / "out"
    skopeo_copy(f"docker://{proxy.host}/acme/podman:{image.tag}", f"dir:{folder}")
    files = read_dir_image(folder)
    manifest = json.loads(files["manifest.json"])
    assert image.config is not None
    assert files[manifest["config"]["digest"].split(":")[1]] == image.config  # the same config; layers recompressed
    for name, data in files.items():
        if name not in ("manifest.json", "version"):
            assert hashlib.sha256(data).hexdigest() == name


@pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed")
def test_buildah_pushes_an_image_it_built_from_scratch(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """buildah 1.28 (containers/image): `from scratch`, copy a file, commit, push; read back byte for byte."""
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    runroot = Path(tempfile.mkdtemp(prefix="pp-buildah-"))
    buildah = ["buildah", "--root", str(tmp_path / "root"), "--runroot", str(runroot), "--storage-driver", "vfs"]
    content = os.urandom(1 << 20)
    (tmp_path / "data.bin").write_bytes(content)
    try:
        container = run([*buildah, "from", "scratch"], timeout=120).stdout.decode().strip()
        run([*buildah, "copy", container, str(tmp_path / "data.bin"), "/data.bin"], timeout=120)
        run([*buildah, "config", "--cmd", "/data.bin", container], timeout=60)
        run([*buildah, "commit", "-q", container, "localhost/acme-built:1"], timeout=120)
        digestfile = tmp_path / "digest"
        target = f"docker://{proxy.host}/acme/built:1"
        push = [*buildah, "push", "--tls-verify=false", "--digestfile", str(digestfile), "localhost/acme-built:1"]
        run([*push, target], timeout=120)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
    digest = digestfile.read_text().strip()
    with httpx.Client(base_url=proxy.url, timeout=60) as client:
        by_tag = client.get(
            "/v2/acme/built/manifests/1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
        )
        assert by_tag.status_code == 200
        assert by_tag.headers["Docker-Content-Digest"] == digest == sha(by_tag.content)
    folder = tmp_path / "out"
    skopeo_copy(f"docker://{proxy.host}/acme/built@{digest}", f"dir:{folder}")
    files = read_dir_image(folder)
    manifest = json.loads(files["manifest.json"])
    (layer,) = manifest["layers"]
    data = files[layer["digest"].split(":")[1]]
    assert hashlib.sha256(data).hexdigest() == layer["digest"].split(":")[1]
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.extractfile("data.bin")
        assert member is not None and member.read() == content


def _peak_rss(pid: int) -> int:
    """Bytes: the process's peak resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_upload_streams_to_disk_with_flat_memory(
    proxy_factory: Callable[..., Proxy], upstream: Registry
) -> None:
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    assert proxy.pid is not None
    size = 256 << 20
    piece = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(size // len(piece)):
        digest.update(piece)
    with httpx.Client(base_url=proxy.url, timeout=120) as client:
        client.get("/v2/")
        before = _peak_rss(proxy.pid)
        location = client.post("/v2/acme/big/blobs/uploads/").headers["Location"]
        patched = client.patch(location, content=(piece for _ in range(size // len(piece))))
        assert patched.headers["Range"] == f"0-{size - 1}"
        done = client.put(patched.headers["Location"], params={"digest": f"sha256:{digest.hexdigest()}"})
        assert done.status_code == 201
        assert client.head(f"/v2/acme/big/blobs/sha256:{digest.hexdigest()}").headers["Content-Length"] == str(size)
    assert _peak_rss(proxy.pid) - before < 48 << 20  # a 256 MiB layer, never held in memory


def test_a_1_gib_layer_pushed_and_pulled_back_keeps_memory_flat(
    proxy_factory: Callable[..., Proxy], upstream: Registry
) -> None:
    """1 GiB up in one streamed PATCH and back down in one GET: the server's peak memory barely moves."""
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    assert proxy.pid is not None
    size = 1 << 30
    piece = os.urandom(4 << 20)
    pieces = size // len(piece)
    digest = hashlib.sha256()
    for _ in range(pieces):
        digest.update(piece)
    name = f"sha256:{digest.hexdigest()}"
    with httpx.Client(base_url=proxy.url, timeout=300) as client:
        client.get("/v2/")
        before = _peak_rss(proxy.pid)
        location = client.post("/v2/acme/huge/blobs/uploads/").headers["Location"]
        patched = client.patch(location, content=(piece for _ in range(pieces)))
        assert patched.headers["Range"] == f"0-{size - 1}"
        assert client.put(patched.headers["Location"], params={"digest": name}).status_code == 201
        pushed = _peak_rss(proxy.pid) - before
        back = hashlib.sha256()
        received = 0
        with client.stream("GET", f"/v2/acme/huge/blobs/{name}") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes(1 << 20):
                back.update(chunk)
                received += len(chunk)
        assert (received, f"sha256:{back.hexdigest()}") == (size, name)
    pulled = _peak_rss(proxy.pid) - before
    print(f"1 GiB: peak RSS +{pushed >> 20} MiB after the push, +{pulled >> 20} MiB after the pull")
    assert pulled < 64 << 20  # the layer is never held in memory, either way


def test_an_upload_cut_by_kill_9_leaves_nothing_visible(
    proxy_factory: Callable[..., Proxy], upstream: Registry
) -> None:
    proxy = proxy_factory(HOSTED, upstream_url=upstream.url)
    data = os.urandom(8 << 20)

    def body() -> Iterator[bytes]:
        yield data[: 4 << 20]
        assert proxy.pid is not None
        os.kill(proxy.pid, signal.SIGKILL)
        yield data[4 << 20 :]

    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        location = client.post("/v2/acme/cut/blobs/uploads/").headers["Location"]
        try:
            client.put(location, params={"digest": sha(data)}, content=body())
        except httpx.HTTPError:
            pass
        else:
            raise AssertionError("the push was answered although the server was killed")
    proxy.stop()
    proxy.start()
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.head(f"/v2/acme/cut/blobs/{sha(data)}").status_code == 404
        assert client.get("/v2/acme/cut/tags/list").status_code == 404
        again = client.post("/v2/acme/cut/blobs/uploads/", params={"digest": sha(data)}, content=data)
        assert again.status_code == 201
        assert client.get(f"/v2/acme/cut/blobs/{sha(data)}").content == data


def test_skopeo_push_needs_the_push_right_through_the_token_flow(
    upstream: Registry, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    alice, bob = ("alice", "alice-pw"), ("bob", "bob-pw")
    proxy = proxy_factory(
        {
            **HOSTED,
            "auth": {"user": [user_entry(alice, "dev"), user_entry(bob)], "default": "anyone"},
            "access": [{"repository": "acme/**", "pull": "authenticated", "push": ["group:dev"]}],
        },
        upstream_url=upstream.url,
    )
    image: PushedImage = upstream.images["alpine"]  # type: ignore[attr-defined]
    source = f"docker://{upstream.host}/{image.repo}:{image.tag}"
    target = f"docker://{proxy.host}/acme/private:{image.tag}"
    with pytest.raises(CommandError) as anonymous:
        skopeo_copy(source, target)
    assert "401" in anonymous.value.stderr
    with pytest.raises(CommandError) as refused:
        skopeo_copy(source, target, extra=["--dest-creds", "bob:bob-pw"])
    assert "denied" in refused.value.stderr.lower()
    skopeo_copy(source, target, extra=["--dest-creds", "alice:alice-pw"])
    folder = tmp_path / "out"
    skopeo_copy(target, f"dir:{folder}", creds="bob:bob-pw")  # any user may pull
    assert_same_image(folder, image)
