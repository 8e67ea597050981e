"""proxy.http.edge: each domain error becomes one OCI error response."""

from __future__ import annotations

import json

import pytest

from proxy import errors
from proxy.http.edge import error_response


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.name_invalid("UPPER"), 400, "NAME_INVALID"),
        (errors.digest_invalid("sha256:xyz"), 400, "DIGEST_INVALID"),
        (errors.PaginationInvalid("n='x' is not a number"), 400, "PAGINATION_NUMBER_INVALID"),
        (errors.BadRequest("this token service is 'pullproxy'"), 400, "UNSUPPORTED"),
        (errors.Unauthorized("authentication required"), 401, "UNAUTHORIZED"),
        (errors.Denied("requested access to the resource is denied"), 403, "DENIED"),
        (errors.manifest_unknown("acme/app", "1.0"), 404, "MANIFEST_UNKNOWN"),
        (errors.blob_unknown("sha256:" + "0" * 64), 404, "BLOB_UNKNOWN"),
        (errors.name_unknown("quay.io/x", "no upstream"), 404, "NAME_UNKNOWN"),
        (errors.NoSuchEndpoint("no such endpoint /v3/"), 404, "UNSUPPORTED"),
        (errors.unsupported("PUT is not supported"), 405, "UNSUPPORTED"),
        (errors.RangeUnsatisfiable(10), 416, "SIZE_INVALID"),
        (errors.TooManyRequests("slow down", "30"), 429, "TOOMANYREQUESTS"),
        (errors.Internal("internal error"), 500, "UNKNOWN"),
        (errors.bad_upstream("digest mismatch"), 502, "UNKNOWN"),
        (errors.unavailable("upstream down"), 503, "UNAVAILABLE"),
        (errors.offline("acme/app:1.0"), 503, "UNAVAILABLE"),
    ],
)
def test_each_error_kind_has_its_status_and_oci_code(error: errors.RegistryError, status: int, code: str) -> None:
    response = error_response(error)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body["errors"][0]["code"] == code
    assert body["errors"][0]["message"] == error.message
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.headers["Content-Type"] == "application/json"


def test_headers_that_belong_to_an_error_kind() -> None:
    challenge = 'Bearer realm="http://m/token",service="pullproxy"'
    assert error_response(errors.Unauthorized("x", challenge=challenge)).headers["WWW-Authenticate"] == challenge
    assert error_response(errors.unavailable("x")).headers["Retry-After"] == "5"
    assert error_response(errors.TooManyRequests("x", "30")).headers["Retry-After"] == "30"
    assert "Retry-After" not in error_response(errors.offline("acme/app:1.0")).headers  # retrying cannot help
    assert error_response(errors.RangeUnsatisfiable(10)).headers["Content-Range"] == "bytes */10"
