"""The HTTP edge: every domain error becomes an OCI error response here, and only here."""

from __future__ import annotations

import json

from starlette.responses import Response

from proxy import errors

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

_STATUS: dict[type[errors.RegistryError], int] = {
    errors.NameInvalid: 400,
    errors.DigestInvalid: 400,
    errors.PaginationInvalid: 400,
    errors.BadRequest: 400,
    errors.BlobUploadInvalid: 400,
    errors.ManifestBlobUnknown: 400,
    errors.ManifestInvalid: 400,
    errors.TooLarge: 413,
    errors.UploadOutOfOrder: 416,
    errors.Unauthorized: 401,
    errors.Denied: 403,
    errors.NotFound: 404,
    errors.NameUnknown: 404,
    errors.NoSuchEndpoint: 404,
    errors.Unsupported: 405,
    errors.RangeUnsatisfiable: 416,
    errors.HeadersTooLarge: 431,
    errors.TooManyRequests: 429,
    errors.Internal: 500,
    errors.BadUpstream: 502,
    errors.Unavailable: 503,
}


def status_of(error: errors.RegistryError) -> int:
    """The status of the most specific class of `error` that has one."""
    for kind in type(error).__mro__:
        status = _STATUS.get(kind)
        if status is not None:
            return status
    return 500


def error_response(error: errors.RegistryError) -> Response:
    body = {"errors": [{"code": str(error.code), "message": error.message, "detail": error.detail}]}
    headers = dict(API_VERSION)
    if isinstance(error, errors.Unauthorized) and error.challenge:
        headers["WWW-Authenticate"] = error.challenge
    if isinstance(error, errors.Unavailable) and error.retry_after:
        headers["Retry-After"] = error.retry_after
    if isinstance(error, errors.UploadOutOfOrder):
        headers["Range"] = f"0-{max(error.size - 1, 0)}"
    if isinstance(error, errors.RangeUnsatisfiable) and error.size is not None:
        headers["Content-Range"] = f"bytes */{error.size}"
    return Response(json.dumps(body).encode(), status_of(error), headers, media_type="application/json")
