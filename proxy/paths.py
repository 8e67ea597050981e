"""Distribution API paths: which endpoint a path names, and the repository and reference in it.

One classifier for every place that reads a `/v2/...` path: the request metrics and the
status page (incoming requests) and, being free of HTTP framework imports, the upstream
client too (outgoing requests).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Endpoint(StrEnum):
    """A request's route, as the `route` and `kind` metric labels name it (bounded cardinality)."""

    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD = "upload"  # a blob upload to a hosted repository
    TAGS = "tags"
    REFERRERS = "referrers"
    CATALOG = "catalog"
    BASE = "base"
    TOKEN = "token"
    OTHER = "other"


class Classified(NamedTuple):
    endpoint: Endpoint
    name: str  # the repository, "" when the path names none
    reference: str  # tag or digest (`list` for tags), "" when none


# The path segment before the reference, for the endpoints under a repository.
_SEGMENTS = {
    "manifests": Endpoint.MANIFEST,
    "blobs": Endpoint.BLOB,
    "tags": Endpoint.TAGS,
    "referrers": Endpoint.REFERRERS,
}
SEGMENT_OF = {endpoint: segment for segment, endpoint in _SEGMENTS.items()}
_BASE = Classified(Endpoint.BASE, "", "")
_CATALOG = Classified(Endpoint.CATALOG, "", "")
_TOKEN = Classified(Endpoint.TOKEN, "", "")
_OTHER = Classified(Endpoint.OTHER, "", "")


def classify(path: str) -> Classified:
    """The endpoint of a path (no query string), and the repository and reference it names.

    `/v2/<name>/<segment>/<reference>` is taken apart from the right, as Starlette matches
    it, so a repository name may itself contain `manifests` or `blobs`.
    """
    if path.startswith("/v2/"):
        rest, _, reference = path.rpartition("/")
        name, _, segment = rest.rpartition("/")
        endpoint = _SEGMENTS.get(segment)
        if endpoint is not None and len(name) > 4:
            return Classified(endpoint, name[4:], reference)
        if segment == "uploads" and name.endswith("/blobs") and len(name) > 10:
            return Classified(Endpoint.UPLOAD, name[4:-6], reference)
        if path == "/v2/":
            return _BASE
        if path == "/v2/_catalog":
            return _CATALOG
    if path == "/token" or path.endswith("/token"):
        return _TOKEN
    return _OTHER
