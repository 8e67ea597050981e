"""Authenticating to an upstream registry: the Docker token flow and Basic.

On a 401 the registry's `WWW-Authenticate` challenge says what it wants. For Bearer, a
token for the request's repository scope is fetched from the realm (anonymously or with
the configured credentials) and kept per scope until shortly before it expires, so each
repository costs one token request per token lifetime. A cached token that is refused
anyway is replaced once. Credentials are never logged nor put in an error.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncGenerator

import httpx

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_REPOSITORY_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
_EXPIRY_MARGIN = 30.0


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


def scope_for(path: str) -> str | None:
    match = _REPOSITORY_PATH.match(path)
    return f"repository:{match.group(1)}:pull" if match else None


class RegistryAuth(httpx.Auth):
    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username is not None else None
        )
        self._tokens: dict[str, tuple[str, float]] = {}
        self._scheme: str | None = None  # learnt from the first challenge
        self.token_requests = 0

    def _cached_token(self, scope: str) -> str | None:
        found = self._tokens.get(scope)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def _authorize(self, request: httpx.Request, scope: str) -> bool:
        """Attach what is known to work for `scope`; False when nothing is known yet."""
        if self._scheme == "basic" and self._basic:
            request.headers["Authorization"] = self._basic
            return True
        token = self._cached_token(scope)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
            return True
        return False

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scope = scope_for(request.url.path) or ""
        had_credentials = self._authorize(request, scope)
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            self._scheme = "basic"
            if self._basic is None or had_credentials:
                return
            request.headers["Authorization"] = self._basic
            yield request
            return
        if scheme != "bearer" or "realm" not in params:
            return
        self._scheme = "bearer"
        self._tokens.pop(scope, None)
        token = yield self._token_request(params, scope)
        await token.aread()
        if token.status_code != 200:
            return
        try:
            answer = token.json()
            value = answer.get("token") or answer["access_token"]
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        self._tokens[scope] = (value, time.monotonic() + max(lifetime - _EXPIRY_MARGIN, lifetime / 2))
        request.headers["Authorization"] = f"Bearer {value}"
        yield request

    def _token_request(self, challenge: dict[str, str], scope: str) -> httpx.Request:
        self.token_requests += 1
        query: dict[str, str] = {}
        if "service" in challenge:
            query["service"] = challenge["service"]
        if scope or "scope" in challenge:
            query["scope"] = scope or challenge["scope"]
        headers = {"Authorization": self._basic} if self._basic else {}
        return httpx.Request("GET", challenge["realm"], params=query, headers=headers)
