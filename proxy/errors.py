"""Domain errors: what went wrong, in the OCI distribution-spec's terms, with no HTTP.

Each class carries its OCI error code; the HTTP edge (`proxy.http.edge`) gives each its
status and headers once, and the command line prints the message. The helpers below
keep the messages of one kind alike wherever they are raised.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class Code(StrEnum):
    """The OCI distribution-spec error codes pullproxy answers with."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DENIED = "DENIED"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    PAGINATION_NUMBER_INVALID = "PAGINATION_NUMBER_INVALID"
    SIZE_INVALID = "SIZE_INVALID"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    UNAUTHORIZED = "UNAUTHORIZED"
    UNAVAILABLE = "UNAVAILABLE"
    UNKNOWN = "UNKNOWN"
    UNSUPPORTED = "UNSUPPORTED"


class RegistryError(Exception):
    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NameInvalid(RegistryError):
    code = Code.NAME_INVALID


class NameUnknown(RegistryError):
    code = Code.NAME_UNKNOWN


class DigestInvalid(RegistryError):
    code = Code.DIGEST_INVALID


class PaginationInvalid(RegistryError):
    code = Code.PAGINATION_NUMBER_INVALID


class NotFound(RegistryError):
    """Base of the "no such content" errors."""


class ManifestUnknown(NotFound):
    code = Code.MANIFEST_UNKNOWN


class BlobUnknown(NotFound):
    code = Code.BLOB_UNKNOWN


class BlobUploadUnknown(NotFound):
    code = Code.BLOB_UPLOAD_UNKNOWN


class BlobUploadInvalid(RegistryError):
    code = Code.BLOB_UPLOAD_INVALID


class ManifestBlobUnknown(RegistryError):
    """A pushed manifest names a blob or child manifest its repository does not hold."""

    code = Code.MANIFEST_BLOB_UNKNOWN


class ManifestInvalid(RegistryError):
    code = Code.MANIFEST_INVALID


class TooLarge(RegistryError):
    """A pushed body larger than this registry takes (a manifest over 4 MiB)."""

    code = Code.SIZE_INVALID


class UploadOutOfOrder(RegistryError):
    """A chunk whose `Content-Range` does not start where the upload stands; `size`: where it stands."""

    code = Code.BLOB_UPLOAD_INVALID

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class RangeUnsatisfiable(RegistryError):
    code = Code.SIZE_INVALID

    def __init__(self, size: int | None) -> None:
        super().__init__("requested range is not satisfiable")
        self.size = size


class Unsupported(RegistryError):
    code = Code.UNSUPPORTED


class NoSuchEndpoint(Unsupported):
    pass


class HeadersTooLarge(Unsupported):
    """The request head is larger than `[server] max_header_size`."""


class BadRequest(Unsupported):
    """A request this registry understands but refuses as malformed (e.g. a foreign token service)."""


class Unauthorized(RegistryError):
    """Credentials are missing or wrong; `challenge` tells the client how to authenticate."""

    code = Code.UNAUTHORIZED

    def __init__(self, message: str, detail: Any = None, challenge: str | None = None) -> None:
        super().__init__(message, detail)
        self.challenge = challenge


class Denied(RegistryError):
    code = Code.DENIED


class Unavailable(RegistryError):
    """Cannot be answered now; `retry_after` (seconds) when retrying later may help."""

    code = Code.UNAVAILABLE

    def __init__(self, message: str, retry_after: str | None = "5") -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Offline(Unavailable):
    """Not cached, and no upstream may be asked: retrying cannot help until offline mode is turned off."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not cached, and pullproxy is in offline mode ([cache] offline = true)", None)


class TooManyRequests(Unavailable):
    code = Code.TOOMANYREQUESTS


class BadUpstream(RegistryError):
    """The upstream answered with something that cannot be served (wrong digest, too large)."""


class Internal(RegistryError):
    """A defect: never raised on purpose, only what the edge answers for an unexpected exception."""


def name_invalid(name: str) -> NameInvalid:
    return NameInvalid(f"invalid repository name {name!r}", {"name": name})


def name_unknown(name: str, why: str) -> NameUnknown:
    return NameUnknown(why, {"name": name})


def digest_invalid(digest: str) -> DigestInvalid:
    return DigestInvalid(f"invalid digest {digest!r}", {"digest": digest})


def manifest_unknown(name: str, reference: str) -> ManifestUnknown:
    return ManifestUnknown(f"manifest {name}:{reference} not found", {"name": name, "reference": reference})


def blob_unknown(digest: str) -> BlobUnknown:
    return BlobUnknown(f"blob {digest} not found", {"digest": digest})


def unsupported(message: str) -> Unsupported:
    return Unsupported(message)


def unavailable(message: str) -> Unavailable:
    return Unavailable(message)


def offline(what: str) -> Offline:
    return Offline(what)


def bad_upstream(message: str) -> BadUpstream:
    return BadUpstream(message)
