"""OCI layout archives in-process: what the reader refuses, how often it reads, how the writer places its file."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cache import digests
from cache.archive import ArchiveError, ArchiveReader, ArchiveWriter, OutputExists
from cache.manifests import MAX_LEVELS, Descriptor
from cache.storage import Manifest
from cache.store import DiskContentStore

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


class Layout:
    """An OCI layout being built: blobs by digest, then written as a tar with any extra members."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def blob(self, data: bytes) -> dict[str, Any]:
        digest = digests.of(data)
        self.blobs[digest] = data
        return {"mediaType": "application/octet-stream", "digest": digest, "size": len(data)}

    def image(self, seed: str) -> dict[str, Any]:
        config, layer = self.blob(f'{{"seed":"{seed}"}}'.encode()), self.blob(f"layer {seed}".encode())
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
        return {**self.blob(json.dumps(manifest).encode()), "mediaType": OCI_MANIFEST}

    def index(self, children: list[dict[str, Any]]) -> dict[str, Any]:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
        return {**self.blob(body), "mediaType": OCI_INDEX}

    def write(
        self,
        path: Path,
        tops: list[dict[str, Any]],
        index: bytes | None = None,
        layout: bytes = LAYOUT,
        extra: Sequence[tuple[tarfile.TarInfo, bytes | None]] = (),
        skip: Collection[str] = frozenset(),
    ) -> Path:
        if index is None:
            entries = [{**top, "annotations": {"org.opencontainers.image.ref.name": "1"}} for top in tops]
            index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        members: list[tuple[tarfile.TarInfo, bytes | None]] = [(_file("oci-layout", layout), layout)]
        members += [(_file("index.json", index), index)]
        for digest, data in self.blobs.items():
            name = "blobs/" + digest.replace(":", "/")
            if name not in skip:
                members.append((_file(name, data), data))
        with tarfile.open(path, "w") as tar:
            for info, data in [*members, *extra]:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return path


def _file(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture
def extracted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each archive member is read."""
    counts: Counter[str] = Counter()
    original = tarfile.TarFile.extractfile

    def counting(self: tarfile.TarFile, member: str | tarfile.TarInfo) -> Any:
        counts[member if isinstance(member, str) else member.name] += 1
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    return counts


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskContentStore]:
    content = DiskContentStore(tmp_path / "cache", 1 << 30)
    yield content
    content.close()


def refused(path: Path) -> str:
    """The reader's complaint about the archive, at opening, listing or planning its images."""
    with pytest.raises(ArchiveError) as caught:
        reader = ArchiveReader(path)
        try:
            for entry in reader.images():
                reader.plan(entry)
        finally:
            reader.close()
    return str(caught.value)


# -- walks ---------------------------------------------------------------------------------


def test_a_nested_index_repeating_its_children_reads_each_manifest_once(
    tmp_path: Path, extracted: Counter[str]
) -> None:
    archive = Layout()
    level = archive.image("leaf")
    chain = [level]
    for _ in range(4):  # 12 entries per level, all the same child: 12**4 paths to the leaf
        level = archive.index([level] * 12)
        chain.append(level)
    path = archive.write(tmp_path / "nested.tar", [level])
    assert path.stat().st_size < 40_000

    reader = ArchiveReader(path)
    try:
        (entry,) = reader.images()
        plan = reader.plan(entry)
    finally:
        reader.close()
    assert [m.digest for m in plan.manifests] == [d["digest"] for d in chain]  # children first, each once
    assert len(plan.blobs) == 2
    manifests = {"blobs/" + d["digest"].replace(":", "/") for d in chain}
    assert {name: extracted[name] for name in manifests} == dict.fromkeys(manifests, 1)


def test_an_image_nested_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    archive = Layout()
    level = archive.image("leaf")
    for _ in range(MAX_LEVELS):  # MAX_LEVELS indexes above the image: one level too many
        level = archive.index([level])
    path = archive.write(tmp_path / "deep.tar", [level])
    assert f"nested more than {MAX_LEVELS} levels deep" in refused(path)

    shallow = Layout()
    level = shallow.image("leaf")
    for _ in range(MAX_LEVELS - 1):
        level = shallow.index([level])
    reader = ArchiveReader(shallow.write(tmp_path / "ok.tar", [level]))
    try:
        assert len(reader.plan(reader.images()[0]).manifests) == MAX_LEVELS
    finally:
        reader.close()


# -- index.json, oci-layout and members -------------------------------------------------------


def _entry(**fields: object) -> bytes:
    base: dict[str, object] = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 10}
    return json.dumps({"schemaVersion": 2, "manifests": [{**base, **fields}]}).encode()


@pytest.mark.parametrize(
    ("index", "complaint"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"schemaVersion": 2}', 'no "manifests" list'),
        (b'{"schemaVersion": 2, "manifests": {}}', 'no "manifests" list'),
        (b'{"schemaVersion": 2, "manifests": []}', "lists no images"),
        (b'{"schemaVersion": 2, "manifests": [1]}', "manifests[0] is not an object"),
        (b'{"schemaVersion": 3, "manifests": []}', "schemaVersion 3, not 2"),
        (b'{"mediaType": "application/vnd.oci.image.manifest.v1+json", "manifests": []}', "mediaType"),
        (_entry(digest=5), "manifests[0].digest"),
        (_entry(digest="sha256:zz"), "manifests[0].digest"),
        (_entry(size="10"), "manifests[0].size"),
        (_entry(size=-1), "manifests[0].size"),
        (_entry(size=True), "manifests[0].size"),
        (_entry(mediaType=7), "manifests[0].mediaType"),
        (_entry(annotations=["x"]), "manifests[0].annotations"),
    ],
)
def test_an_index_json_that_is_not_an_oci_index_is_refused_saying_why(
    tmp_path: Path, index: bytes, complaint: str
) -> None:
    path = Layout().write(tmp_path / "bad.tar", [], index=index)
    message = refused(path)
    assert message.startswith("index.json ") and complaint in message


@pytest.mark.parametrize(
    ("layout", "complaint"),
    [
        (b"nope", "oci-layout is not JSON"),
        (b"[1]", "oci-layout is not a JSON object"),
        (b"{}", "oci-layout names no imageLayoutVersion"),
        (b'{"imageLayoutVersion": 1.0}', "oci-layout names no imageLayoutVersion"),
        (b'{"imageLayoutVersion": "2.0.0"}', "unsupported OCI layout version '2.0.0'"),
    ],
)
def test_an_oci_layout_file_that_is_not_one_is_refused_saying_why(
    tmp_path: Path, layout: bytes, complaint: str
) -> None:
    archive = Layout()
    path = archive.write(tmp_path / "bad.tar", [archive.image("x")], layout=layout)
    assert refused(path) == f"{path}: {complaint}"


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "blobs/../../escape", "./blobs/sha256/../../../x"])
def test_a_member_whose_name_leaves_the_layout_is_refused(tmp_path: Path, name: str) -> None:
    archive = Layout()
    path = archive.write(tmp_path / "bad.tar", [archive.image("x")], extra=[(_file(name, b"x"), b"x")])
    assert refused(path) == f"{path}: member {name!r} leaves the layout (an absolute path or '..')"


def test_links_where_the_layout_needs_files_are_refused_and_links_elsewhere_ignored(tmp_path: Path) -> None:
    archive = Layout()
    top = archive.image("x")
    layer = "blobs/" + json.loads(archive.blobs[top["digest"]])["layers"][0]["digest"].replace(":", "/")
    legacy = [(_link("abc/layer.tar", f"../{layer}"), None)]  # as `docker save` writes beside its OCI layout
    ok = archive.write(tmp_path / "ok.tar", [top], extra=legacy)
    reader = ArchiveReader(ok)
    try:
        assert len(reader.plan(reader.images()[0]).blobs) == 2
    finally:
        reader.close()

    linked_index = archive.write(
        tmp_path / "index-link.tar", [top], extra=[(_link("index.json", layer), None)], index=b"{}"
    )
    assert refused(linked_index) == f"{linked_index}: index.json in the archive is a symbolic link, not a file"
    linked_layer = archive.write(
        tmp_path / "layer-link.tar", [top], skip={layer}, extra=[(_link(layer, "oci-layout", tarfile.LNKTYPE), None)]
    )
    digest = layer.removeprefix("blobs/").replace("/", ":")
    assert refused(linked_layer) == f"blob {digest} in the archive is a hard link, not a file"


def test_a_manifest_that_is_not_json_or_too_large_or_of_another_size_is_refused(tmp_path: Path) -> None:
    archive = Layout()
    layer = archive.blob(b"not a manifest")
    path = archive.write(tmp_path / "layer.tar", [{**layer, "mediaType": OCI_MANIFEST}])
    assert refused(path) == f"manifest {layer['digest']} in the archive is not a JSON object"

    image = archive.image("x")
    path = archive.write(tmp_path / "size.tar", [{**image, "size": image["size"] + 1}])
    size = image["size"]
    assert refused(path) == f"manifest {image['digest']} in the archive: size {size}, expected {size + 1}"

    huge = archive.blob(b"{" + b" " * (4 << 20) + b"}")
    path = archive.write(tmp_path / "huge.tar", [{**huge, "mediaType": OCI_MANIFEST}])
    assert refused(path) == f"manifest {huge['digest']} in the archive is larger than {4 << 20} bytes"

    bad_child = archive.index([{"mediaType": OCI_MANIFEST, "digest": "sha256:nothex", "size": 2}])
    path = archive.write(tmp_path / "child.tar", [bad_child])
    assert refused(path) == f"manifest {bad_child['digest']} names an invalid digest 'sha256:nothex'"


def test_a_blob_of_another_size_than_its_descriptor_says_so(tmp_path: Path, store: DiskContentStore) -> None:
    archive = Layout()
    top = archive.image("x")
    path = archive.write(tmp_path / "a.tar", [top])
    manifest = json.loads(archive.blobs[top["digest"]])
    layer = manifest["layers"][0]
    reader = ArchiveReader(path)
    try:
        longer = Descriptor(layer["digest"], layer["size"] + 5)
        with pytest.raises(ArchiveError) as caught:
            reader.import_blob(store, longer, lambda _: None)
        size = layer["size"]
        assert str(caught.value) == f"blob {layer['digest']} in the archive: size {size}, expected {size + 5}"
        assert not store.has_blob(layer["digest"])
        assert reader.import_blob(store, Descriptor(layer["digest"], layer["size"]), lambda _: None)
        assert store.has_blob(layer["digest"])
    finally:
        reader.close()
    assert list(store.partial_dir.iterdir()) == []  # no staged file left


# -- the writer ------------------------------------------------------------------------------


def test_the_writer_never_replaces_an_output_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "out.tar"
    writer = ArchiveWriter(target)
    writer.add_bytes(digests.of(b"{}"), b"{}")
    target.write_bytes(b"someone else's")
    with pytest.raises(OutputExists):
        writer.commit()
    writer.abort()
    assert target.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar"]

    replacing = ArchiveWriter(target, replace=True)
    replacing.add_bytes(digests.of(b"{}"), b"{}")
    replacing.add_image(Manifest(digests.of(b"{}"), OCI_MANIFEST, b"{}"), "docker.io/acme/x:1")
    replacing.commit()
    with tarfile.open(target) as tar:
        names = tar.getnames()
    assert names == ["oci-layout", "blobs", "blobs/sha256", f"blobs/sha256/{digests.of(b'{}')[7:]}", "index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar"]


def test_the_writer_refuses_a_blob_shorter_or_longer_than_its_size(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path / "out.tar")
    try:
        digest = digests.of(b"abc")
        with pytest.raises(ArchiveError, match=rf"blob {digest}: 3 bytes, expected 4"):
            writer.add_blob(digest, 4, io.BytesIO(b"abc"))
    finally:
        writer.abort()
    writer = ArchiveWriter(tmp_path / "out.tar")
    try:
        with pytest.raises(ArchiveError, match=rf"blob {digest}: more than 2 bytes"):
            writer.add_blob(digest, 2, io.BytesIO(b"abc"))
    finally:
        writer.abort()
    assert list(tmp_path.iterdir()) == []
