"""Manifest media types, and what to ask an upstream for."""

from __future__ import annotations

import json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, OCI_ARTIFACT, DOCKER_SCHEMA1_SIGNED)

# Distribution answers OCI manifests only when Accept names them, and converts schema2 to
# schema1 when Accept is empty: always ask with every type, whatever the client asked.
UPSTREAM_ACCEPT = ", ".join(MANIFEST_TYPES) + ", */*;q=0.1"

_GENERIC = {"", "application/json", "text/plain", "application/octet-stream"}


def manifest_media_type(content_type: str | None, body: bytes) -> str:
    """The manifest's own media type: the upstream's header unless it is generic, then the body's."""
    declared = (content_type or "").split(";")[0].strip()
    if declared not in _GENERIC:
        return declared
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        media_type = parsed.get("mediaType")
        if isinstance(media_type, str):
            return media_type
        if parsed.get("schemaVersion") == 1:
            return DOCKER_SCHEMA1_SIGNED
        if "manifests" in parsed:
            return OCI_INDEX
        return OCI_MANIFEST
    return declared or OCI_MANIFEST
