"""Registry errors in the OCI envelope: `{"errors": [{"code", "message", "detail"}]}`."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class RegistryError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> Response:
        body = json.dumps({"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}).encode()
        headers = {"Docker-Distribution-API-Version": "registry/2.0", **self.headers}
        return Response(body, self.status, headers, media_type="application/json")


def name_invalid(name: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", f"invalid repository name {name!r}", {"name": name})


def name_unknown(name: str, why: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", why, {"name": name})


def digest_invalid(digest: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", f"invalid digest {digest!r}", {"digest": digest})


def manifest_unknown(name: str, reference: str) -> RegistryError:
    return RegistryError(
        404,
        "MANIFEST_UNKNOWN",
        f"manifest {name}:{reference} not found",
        {"name": name, "reference": reference},
    )


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", f"blob {digest} not found", {"digest": digest})


def unsupported(message: str, status: int = 405) -> RegistryError:
    return RegistryError(status, "UNSUPPORTED", message)


def unavailable(message: str) -> RegistryError:
    return RegistryError(503, "UNAVAILABLE", message, headers={"Retry-After": "5"})


def offline(what: str) -> RegistryError:
    """503 without Retry-After: retrying cannot help until the operator turns offline mode off."""
    return RegistryError(
        503, "UNAVAILABLE", f"{what} is not cached, and pullproxy is in offline mode ([cache] offline = true)"
    )


def bad_upstream(message: str) -> RegistryError:
    """The upstream answered with something that cannot be served (wrong digest, too large)."""
    return RegistryError(502, "UNKNOWN", message)
