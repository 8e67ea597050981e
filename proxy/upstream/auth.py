"""Authenticating to an upstream registry: the Docker token flow and Basic.

On a 401 the registry's `WWW-Authenticate` challenge says what it wants. For Bearer, a
token for the request's repository scope is fetched from the realm (anonymously or with
the configured credentials) and kept per scope until shortly before it expires, so each
repository costs one token request per token lifetime. A cached token that is refused
anyway is replaced once. Credentials are never logged nor put in an error.

The realm is a URL the upstream chooses, so it is checked like a redirect target (see
`upstream.egress`), and the configured credentials go to it only over https, or to the
upstream's own host when the upstream itself is plain HTTP; otherwise the token is asked
for anonymously. This is plain logic: `proxy.upstream` sends the requests, reading no
challenge body and a token answer only up to a limit.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Awaitable, Callable

import httpx
import structlog

from proxy.paths import classify
from proxy.upstream.egress import Egress

log = structlog.get_logger("pullproxy")
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_EXPIRY_MARGIN = 30.0

TokenFetch = Callable[[httpx.Request], Awaitable[tuple[int, bytes]]]
"""Sends a token request; the status and (when 200) the body of the answer."""


class RealmRefused(Exception):
    """The challenge names a realm the mirror may not ask (see `Egress.address_refusal`)."""


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


def scope_for(path: str) -> str | None:
    name = classify(path).name
    return f"repository:{name}:pull" if name else None


class RegistryAuth:
    def __init__(self, egress: Egress, username: str | None = None, password: str | None = None) -> None:
        self.egress = egress
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username is not None else None
        )
        self._tokens: dict[str, tuple[str, float]] = {}
        self._scheme: str | None = None  # learnt from the first challenge
        self._warned: set[str] = set()  # realms told once that they get no credentials
        self.token_requests = 0

    def _cached_token(self, scope: str) -> str | None:
        found = self._tokens.get(scope)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def authorize(self, request: httpx.Request, scope: str) -> bool:
        """Attach what is known to work for `scope` to a request for the upstream; False when nothing is."""
        if self._scheme == "basic" and self._basic:
            request.headers["Authorization"] = self._basic  # the upstream's own origin, as configured
            return True
        token = self._cached_token(scope)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
            return True
        return False

    async def answer(self, request: httpx.Request, challenge: str, scope: str, sent: bool, fetch: TokenFetch) -> bool:
        """After a 401 with `challenge`: set `request` up for one more try; False when there is none.

        `sent` says whether the refused request carried what `authorize` knew.
        """
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            self._scheme = "basic"
            if self._basic is None or sent:
                return False
            request.headers["Authorization"] = self._basic
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        self._scheme = "bearer"
        self._tokens.pop(scope, None)
        status, body = await fetch(await self._token_request(params, scope))
        if status != 200:
            return False
        try:
            answer = json.loads(body)
            value = answer.get("token") or answer["access_token"]
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        if not isinstance(value, str):
            return False
        self._tokens[scope] = (value, time.monotonic() + max(lifetime - _EXPIRY_MARGIN, lifetime / 2))
        request.headers["Authorization"] = f"Bearer {value}"
        return True

    async def _token_request(self, challenge: dict[str, str], scope: str) -> httpx.Request:
        try:
            realm = httpx.URL(challenge["realm"])
        except httpx.InvalidURL:
            raise RealmRefused("the token realm is not a URL") from None
        refusal = await self.egress.address_refusal(realm)
        if refusal is not None:
            raise RealmRefused(f"token realm {realm.host} refused: {refusal}")
        self.token_requests += 1
        query: dict[str, str] = {}
        if "service" in challenge:
            query["service"] = challenge["service"]
        if scope or "scope" in challenge:
            query["scope"] = scope or challenge["scope"]
        headers = {}
        if self._basic:
            if await self.egress.may_get_credentials(realm):
                headers["Authorization"] = self._basic
            elif realm.host not in self._warned:
                self._warned.add(realm.host)
                log.warning(
                    "token realm gets no credentials: it is neither https nor the plain-HTTP upstream's own host",
                    realm=f"{realm.scheme}://{realm.host}",
                )
        return httpx.Request("GET", realm.copy_merge_params(query), headers=headers)
