"""What a manifest refers to: child manifests of an index, blobs of an image.

The one place that knows manifest structure, for everything that walks an image:
prefetch, pins, export, import and the cache tools.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cache import digests

# Docker buildx attaches provenance/SBOM manifests to an index, bound to one platform's manifest.
_REFERENCE_TYPE = "vnd.docker.reference.type"
_REFERENCE_DIGEST = "vnd.docker.reference.digest"
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# Every walk over an image visits each digest once and goes at most this deep (an index of
# indexes of images is 3 levels): repeated or nested children cannot make one image cost
# more than its distinct manifests, and a chain of indexes cannot run a walk on forever.
MAX_LEVELS = 8


class InvalidIndex(ValueError):
    """A body that is not an OCI image index; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: str
    size: int | None  # None for schema 1 layers, which do not say
    media_type: str = ""
    platform: str | None = None  # "os/arch[/variant]" of an index entry
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refs:
    manifests: list[Descriptor]  # an index's entries
    blobs: list[Descriptor]  # an image's config and layers


def refs(body: bytes) -> Refs:
    """Children and blobs named by a manifest body; a body that is not JSON names nothing."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return Refs([], [])
    if not isinstance(parsed, dict):
        return Refs([], [])
    children = [_descriptor(d) for d in parsed.get("manifests") or [] if isinstance(d, dict)]
    blobs = [_descriptor(parsed["config"])] if isinstance(parsed.get("config"), dict) else []
    for key in ("layers", "blobs"):  # "blobs": the short-lived OCI artifact manifest
        blobs += [_descriptor(d) for d in parsed.get(key) or [] if isinstance(d, dict)]
    for layer in parsed.get("fsLayers") or []:  # Docker schema 1
        if isinstance(layer, dict) and "blobSum" in layer:
            blobs.append(Descriptor(str(layer["blobSum"]), None))
    unique = {b.digest: b for b in blobs if b.digest}  # schema 1 repeats its empty layer
    return Refs([c for c in children if c.digest], list(unique.values()))


def index_entries(body: bytes) -> list[Descriptor]:
    """The entries of an OCI image index, checked as the image spec requires (`refs` is lenient)."""
    try:
        parsed = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        raise InvalidIndex("not JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidIndex("not a JSON object")
    if parsed.get("schemaVersion", 2) != 2:
        raise InvalidIndex(f"schemaVersion {parsed['schemaVersion']!r}, not 2")
    if parsed.get("mediaType", _OCI_INDEX) != _OCI_INDEX:
        raise InvalidIndex(f"mediaType {parsed['mediaType']!r}, not {_OCI_INDEX}")
    entries = parsed.get("manifests")
    if not isinstance(entries, list):
        raise InvalidIndex('no "manifests" list')
    for i, entry in enumerate(entries):
        where = f"manifests[{i}]"
        if not isinstance(entry, dict):
            raise InvalidIndex(f"{where} is not an object")
        digest, size = entry.get("digest"), entry.get("size")
        if not isinstance(digest, str) or not valid_digest(digest):
            raise InvalidIndex(f"{where}.digest {digest!r} is not a valid digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidIndex(f"{where}.size {size!r} is not a byte count")
        if not isinstance(entry.get("mediaType", ""), str):
            raise InvalidIndex(f"{where}.mediaType is not a string")
        annotations = entry.get("annotations", {})
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise InvalidIndex(f"{where}.annotations is not an object of strings")
    return [_descriptor(entry) for entry in entries]


def valid_digest(digest: str) -> bool:
    try:
        digests.parse(digest)
    except digests.InvalidDigest:
        return False
    return True


def _descriptor(raw: dict[str, Any]) -> Descriptor:
    platform = raw.get("platform")
    name = None
    if isinstance(platform, dict) and platform.get("os") and platform.get("architecture"):
        name = f"{platform['os']}/{platform['architecture']}"
        if platform.get("variant"):
            name += f"/{platform['variant']}"
    size = raw.get("size")
    annotations = raw.get("annotations")
    return Descriptor(
        digest=str(raw.get("digest") or ""),
        size=size if isinstance(size, int) and size >= 0 else None,
        media_type=str(raw.get("mediaType") or ""),
        platform=name,
        annotations={str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {},
    )


def matches(platform: str | None, wanted: str) -> bool:
    """`linux/arm64` matches any variant of it; `linux/arm/v7` only that variant."""
    if platform is None:
        return False
    have, want = platform.split("/"), wanted.split("/")
    return have[:2] == want[:2] and (len(want) < 3 or have[2:3] == want[2:3])


def select(children: list[Descriptor], platforms: Iterable[str] | None) -> list[Descriptor]:
    """An index's entries for `platforms` (None: all), with the attestations that belong to them."""
    if platforms is None:
        return list(children)
    wanted = list(platforms)
    chosen = [c for c in children if any(matches(c.platform, w) for w in wanted)]
    picked = {c.digest for c in chosen}
    attached = [
        c for c in children if _REFERENCE_TYPE in c.annotations and c.annotations.get(_REFERENCE_DIGEST) in picked
    ]
    return chosen + [c for c in attached if c.digest not in picked]
