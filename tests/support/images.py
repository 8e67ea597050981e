"""Build synthetic OCI/Docker images in Python and push them with the raw V2 API.

No docker daemon exists in the sandbox, and a hand-built image also means
every byte (and thus every digest) is known to the test. Content is derived
from a seed so that runs are reproducible; images are nevertheless *valid*:
layers are real tar archives and the config's ``rootfs.diff_ids`` match, so
containerd can unpack them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"

#: Every manifest type we push. distribution 2.8 only returns OCI manifests
#: when the Accept header lists the OCI types, so verification always sends all.
MANIFEST_ACCEPT: tuple[str, ...] = (
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

_CHUNK = 1 << 20
_EPOCH = 1_700_000_000  # fixed mtime so tar bytes are reproducible


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON: the bytes we hash are the bytes we push."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class PushedImage:
    """What was pushed: enough for a test to verify a mirror byte for byte.

    For indexes ``blobs`` is empty and ``children`` holds the per-platform
    manifests (pushed by digest, untagged). ``tags`` lists every tag that points
    at ``digest`` (``tag`` is the first one, ``None`` for untagged children).
    """

    repo: str
    tag: str | None
    digest: str
    media_type: str
    manifest: bytes
    blobs: list[Blob] = field(default_factory=list)
    children: list[PushedImage] = field(default_factory=list)
    platform: dict[str, str] | None = None
    config: bytes | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``repo:tag`` (or ``repo@digest`` when untagged)."""
        return f"{self.repo}:{self.tag}" if self.tag else f"{self.repo}@{self.digest}"

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            desc["platform"] = dict(self.platform)
        return desc

    def child(self, os_name: str = "linux", arch: str = "amd64") -> PushedImage:
        for c in self.children:
            if c.platform and c.platform.get("os") == os_name and c.platform.get("architecture") == arch:
                return c
        raise KeyError(f"{self.ref} has no {os_name}/{arch} child")

    def all_blobs(self) -> list[Blob]:
        """Blobs of this manifest and of all its children, deduplicated."""
        seen: dict[str, Blob] = {b.digest: b for b in self.blobs}
        for c in self.children:
            for b in c.all_blobs():
                seen.setdefault(b.digest, b)
        return list(seen.values())

    def all_manifests(self) -> list[PushedImage]:
        return [self, *(m for c in self.children for m in c.all_manifests())]


# --------------------------------------------------------------------------- building


@dataclass
class Layer:
    """A layer blob held in memory (small layers only)."""

    data: bytes
    diff_id: str
    media_type: str

    @property
    def blob(self) -> Blob:
        return Blob(sha256_digest(self.data), len(self.data), self.media_type)


def _tarinfo(name: str, *, size: int = 0, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = mode
    info.mtime = _EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def make_tar(files: dict[str, bytes]) -> bytes:
    """Deterministic PAX tar of ``files`` (parent dirs added explicitly)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    tar.addfile(_tarinfo(d + "/", kind=tarfile.DIRTYPE, mode=0o755))
            data = files[name]
            tar.addfile(_tarinfo(name, size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with mtime=0 and no file name so the digest is reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


def make_layer(files: dict[str, bytes], media_type: str = OCI_LAYER_GZIP) -> Layer:
    tar = make_tar(files)
    data = gzip_bytes(tar) if media_type.endswith("gzip") else tar
    return Layer(data, sha256_digest(tar), media_type)


def seeded_files(seed: str, count: int = 2, size: int = 2048) -> dict[str, bytes]:
    """A few pseudo-random files whose content depends only on ``seed``."""
    rng = random.Random(seed)
    slug = hashlib.sha256(seed.encode()).hexdigest()[:12]
    files = {f"opt/pullproxy/{slug}/file{i}.bin": rng.randbytes(size) for i in range(count)}
    files[f"etc/pullproxy/{slug}.txt"] = f"seed={seed}\n".encode()
    return files


def image_config(
    diff_ids: list[str], *, os_name: str = "linux", arch: str = "amd64", variant: str | None = None
) -> bytes:
    """A runnable-looking image config; containerd checks diff_ids on unpack."""
    cfg: dict[str, Any] = {
        "architecture": arch,
        "os": os_name,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "pullproxy tests"} for _ in diff_ids],
    }
    if variant:
        cfg["variant"] = variant
    return canonical_json(cfg)


def image_manifest(config: Blob, layers: list[Blob], media_type: str) -> bytes:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in layers],
    }
    return canonical_json(body)


def index_manifest(children: list[PushedImage], media_type: str) -> bytes:
    return canonical_json(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": [c.descriptor() for c in children]}
    )


# --------------------------------------------------------------------------- pushing


class Pusher:
    """Minimal V2 push client (monolithic POST + PUT?digest=, then manifest PUT)."""

    def __init__(self, registry_url: str, auth: tuple[str, str] | None = None, timeout: float = 120.0):
        self.base = registry_url.rstrip("/")
        self.client = httpx.Client(auth=auth, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self.client.head(f"{self.base}/v2/{repo}/blobs/{digest}").status_code == 200

    def _upload_location(self, repo: str) -> str:
        resp = self.client.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        if resp.status_code != 202:
            raise RuntimeError(f"upload start for {repo} failed: {resp.status_code} {resp.text}")
        location = urljoin(self.base + "/", resp.headers["Location"])
        return location

    def push_blob(self, repo: str, data: bytes, media_type: str = "application/octet-stream") -> Blob:
        digest = sha256_digest(data)
        if not self.blob_exists(repo, digest):
            self._put_blob(repo, digest, data, len(data))
        return Blob(digest, len(data), media_type)

    def push_blob_stream(self, repo: str, digest: str, size: int, chunks: Iterator[bytes]) -> None:
        """Stream ``chunks`` as the PUT body with an explicit Content-Length."""
        if not self.blob_exists(repo, digest):
            self._put_blob(repo, digest, chunks, size)

    def push_blob_file(self, repo: str, path: Path, digest: str, media_type: str) -> Blob:
        size = path.stat().st_size
        self.push_blob_stream(repo, digest, size, _file_chunks(path))
        return Blob(digest, size, media_type)

    def _put_blob(self, repo: str, digest: str, content: bytes | Iterator[bytes], size: int) -> None:
        location = self._upload_location(repo)
        sep = "&" if "?" in location else "?"
        resp = self.client.put(
            f"{location}{sep}digest={digest}",
            content=content,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        if resp.status_code != 201:
            raise RuntimeError(f"blob PUT {repo}@{digest} failed: {resp.status_code} {resp.text}")

    def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        resp = self.client.put(
            f"{self.base}/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
        )
        if resp.status_code != 201:
            raise RuntimeError(f"manifest PUT {repo}:{reference} failed: {resp.status_code} {resp.text}")
        digest = sha256_digest(body)
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RuntimeError(f"registry computed {served} for a manifest we hashed as {digest}")
        return digest

    def push_image(
        self,
        repo: str,
        tags: list[str] | str | None,
        config: bytes,
        layers: list[Layer],
        *,
        manifest_type: str = OCI_MANIFEST,
        config_type: str = OCI_CONFIG,
        platform: dict[str, str] | None = None,
        extra_blobs: list[Blob] | None = None,
    ) -> PushedImage:
        """Push blobs, then the manifest by digest and under every tag."""
        tag_list = [tags] if isinstance(tags, str) else list(tags or [])
        cfg_blob = self.push_blob(repo, config, config_type)
        layer_blobs = [self.push_blob(repo, layer.data, layer.media_type) for layer in layers]
        layer_blobs += extra_blobs or []
        body = image_manifest(cfg_blob, layer_blobs, manifest_type)
        digest = self._push_manifest_refs(repo, tag_list, body, manifest_type)
        return PushedImage(
            repo,
            tag_list[0] if tag_list else None,
            digest,
            manifest_type,
            body,
            [cfg_blob, *layer_blobs],
            [],
            platform,
            config,
            tag_list,
        )

    def push_index(
        self, repo: str, tags: list[str] | str, children: list[PushedImage], media_type: str = OCI_INDEX
    ) -> PushedImage:
        tag_list = [tags] if isinstance(tags, str) else list(tags)
        body = index_manifest(children, media_type)
        digest = self._push_manifest_refs(repo, tag_list, body, media_type)
        return PushedImage(
            repo, tag_list[0] if tag_list else None, digest, media_type, body, [], children, None, None, tag_list
        )

    def _push_manifest_refs(self, repo: str, tags: list[str], body: bytes, media_type: str) -> str:
        digest = self.push_manifest(repo, sha256_digest(body), body, media_type)
        for tag in tags:
            self.push_manifest(repo, tag, body, media_type)
        return digest


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


class _RandomReader:
    """File-like source of ``size`` seeded pseudo-random bytes (for tarfile)."""

    def __init__(self, size: int, seed: str) -> None:
        self.remaining = size
        self.rng = random.Random(seed)

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.remaining:
            n = self.remaining
        self.remaining -= n
        return self.rng.randbytes(n)


class _HashingWriter:
    """Write-through file wrapper that hashes as it writes (one pass, no RAM copy)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.fh.flush()


def random_chunks(size: int, seed: str, chunk: int = _CHUNK) -> Iterator[bytes]:
    """``size`` deterministic pseudo-random bytes, ``chunk`` at a time."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        left -= n
        yield rng.randbytes(n)


# --------------------------------------------------------------------------- public builders


def _platform(os_name: str, arch: str, variant: str | None = None) -> dict[str, str]:
    plat = {"architecture": arch, "os": os_name}
    if variant:
        plat["variant"] = variant
    return plat


def push_oci_image(
    registry_url: str,
    repo: str,
    tags: list[str] | str | None,
    *,
    seed: str | None = None,
    arch: str = "amd64",
    variant: str | None = None,
    layers: int = 2,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """Single-platform OCI image with gzip layers (containerd can unpack it)."""
    return _push_single(registry_url, repo, tags, seed, arch, variant, layers, auth, docker=False)


def push_docker_image(
    registry_url: str,
    repo: str,
    tags: list[str] | str | None,
    *,
    seed: str | None = None,
    arch: str = "amd64",
    variant: str | None = None,
    layers: int = 2,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """Docker schema2 image (docker config + rootfs.diff.tar.gzip layers)."""
    return _push_single(registry_url, repo, tags, seed, arch, variant, layers, auth, docker=True)


def _push_single(
    registry_url: str,
    repo: str,
    tags: list[str] | str | None,
    seed: str | None,
    arch: str,
    variant: str | None,
    nlayers: int,
    auth: tuple[str, str] | None,
    *,
    docker: bool,
) -> PushedImage:
    seed = seed or f"{repo}:{tags}:{arch}"
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    layers = [make_layer(seeded_files(f"{seed}/layer{i}"), layer_type) for i in range(nlayers)]
    config = image_config([lay.diff_id for lay in layers], arch=arch, variant=variant)
    with Pusher(registry_url, auth) as p:
        return p.push_image(
            repo,
            tags,
            config,
            layers,
            manifest_type=DOCKER_MANIFEST if docker else OCI_MANIFEST,
            config_type=DOCKER_CONFIG if docker else OCI_CONFIG,
            platform=_platform("linux", arch, variant),
        )


def push_multiarch(
    registry_url: str,
    repo: str,
    tags: list[str] | str,
    *,
    seed: str | None = None,
    docker: bool = False,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """OCI index (or Docker manifest list) over linux/amd64 and linux/arm64/v8."""
    seed = seed or f"{repo}:{tags}"
    plats = [("amd64", None), ("arm64", "v8")]
    children = [
        _push_single(registry_url, repo, None, f"{seed}/{arch}", arch, variant, 2, auth, docker=docker)
        for arch, variant in plats
    ]
    with Pusher(registry_url, auth) as p:
        return p.push_index(repo, tags, children, DOCKER_LIST if docker else OCI_INDEX)


def push_helm_chart(
    registry_url: str,
    repo: str = "charts/mychart",
    version: str = "0.1.0",
    *,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """A Helm 3 OCI chart artifact (non-image config and layer media types)."""
    name = repo.rsplit("/", 1)[-1]
    chart_yaml = f"apiVersion: v2\nname: {name}\nversion: {version}\ntype: application\n".encode()
    files = {
        f"{name}/Chart.yaml": chart_yaml,
        f"{name}/values.yaml": b"replicaCount: 1\n",
        f"{name}/templates/configmap.yaml": (
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  k: v\n"
        ),
    }
    layer = make_layer(files, HELM_CHART)
    config = canonical_json({"apiVersion": "v2", "name": name, "version": version, "type": "application"})
    with Pusher(registry_url, auth) as p:
        return p.push_image(repo, version, config, [layer], config_type=HELM_CONFIG)


def write_random_layer(path: Path, size: int, seed: str) -> tuple[str, int]:
    """Write an uncompressed tar holding one ``size``-byte random file; return (digest, size).

    Streams through tarfile into the file while hashing, so memory stays flat
    even for hundreds of MiB. Uncompressed means digest == diff_id.
    """
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            tar.addfile(_tarinfo("data/", kind=tarfile.DIRTYPE, mode=0o755))
            tar.addfile(_tarinfo("data/random.bin", size=size), _RandomReader(size, seed))  # type: ignore[arg-type]
        writer.flush()
    return "sha256:" + writer.hash.hexdigest(), writer.size


def push_big_image(
    registry_url: str,
    repo: str = "acme/big",
    tag: str = "latest",
    *,
    size: int = 256 << 20,
    seed: str = "big",
    tmpdir: str | Path | None = None,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """OCI image with one large uncompressed layer, streamed from a temp file."""
    fd, name = tempfile.mkstemp(prefix="pp-big-", suffix=".tar", dir=tmpdir)
    os.close(fd)
    path = Path(name)
    try:
        digest, _ = write_random_layer(path, size, seed)
        config = image_config([digest])
        with Pusher(registry_url, auth) as p:
            layer_blob = p.push_blob_file(repo, path, digest, OCI_LAYER)
            return p.push_image(repo, tag, config, [], platform=_platform("linux", "amd64"), extra_blobs=[layer_blob])
    finally:
        path.unlink(missing_ok=True)


def push_random_blob(
    registry_url: str,
    repo: str,
    size: int,
    *,
    seed: str = "blob",
    auth: tuple[str, str] | None = None,
) -> Blob:
    """Push ``size`` seeded random bytes as a bare blob (benchmarks fetch it by digest).

    The digest is computed in a first generation pass and the body regenerated
    while streaming, so no copy of the blob is held in memory or on disk.
    """
    h = hashlib.sha256()
    for chunk in random_chunks(size, seed):
        h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    with Pusher(registry_url, auth) as p:
        p.push_blob_stream(repo, digest, size, random_chunks(size, seed))
    return Blob(digest, size, "application/octet-stream")


def fetch_manifest(
    registry_url: str, repo: str, reference: str, *, auth: tuple[str, str] | None = None
) -> httpx.Response:
    """GET a manifest with the full Accept list (needed for OCI on distribution 2.8)."""
    return httpx.get(
        f"{registry_url.rstrip('/')}/v2/{repo}/manifests/{reference}",
        headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
        auth=auth,
        timeout=30,
    )


def seed_all(
    registry_url: str,
    tmpdir: str | Path | None = None,
    *,
    big_size: int = 256 << 20,
    auth: tuple[str, str] | None = None,
) -> dict[str, PushedImage]:
    """Push the standard test corpus and describe it.

    Keys: ``alpine`` (library/alpine:latest), ``alpine_319`` (library/alpine:3.19,
    a different image), ``multi`` (acme/multi:latest OCI index), ``docker``
    (acme/docker:latest schema2), ``dockerlist`` (acme/dockerlist:latest manifest
    list), ``helm`` (charts/mychart:0.1.0), ``big`` (acme/big:latest, one
    ``big_size`` layer), ``tagged`` (acme/tagged, one image under tags v1..v7 for
    tags/list pagination).
    """
    return {
        "alpine": push_oci_image(registry_url, "library/alpine", "latest", auth=auth),
        "alpine_319": push_oci_image(registry_url, "library/alpine", "3.19", auth=auth),
        "multi": push_multiarch(registry_url, "acme/multi", "latest", auth=auth),
        "docker": push_docker_image(registry_url, "acme/docker", "latest", auth=auth),
        "dockerlist": push_multiarch(registry_url, "acme/dockerlist", "latest", docker=True, auth=auth),
        "helm": push_helm_chart(registry_url, "charts/mychart", "0.1.0", auth=auth),
        "tagged": push_oci_image(registry_url, "acme/tagged", [f"v{i}" for i in range(1, 8)], layers=1, auth=auth),
        "big": push_big_image(registry_url, "acme/big", "latest", size=big_size, tmpdir=tmpdir, auth=auth),
    }
