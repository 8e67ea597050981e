"""Per-request accounting: the request and cache counters, and the status page's recent history.

One pure ASGI middleware. Per request it classifies the path with one regex into a route
of bounded cardinality and increments two or three counters; nothing else on the hot
path. Most pulled images and recent errors are kept in bounded memory, per process.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cache import digests
from proxy import metrics

_REPOSITORY_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags|referrers)/(?P<reference>[^/]*)$")
_KINDS = {"manifests": "manifest", "blobs": "blob", "tags": "tags", "referrers": "referrers"}
FROM_CACHE = frozenset({"hit", "revalidated", "stale"})


def classify(path: str) -> tuple[str, re.Match[str] | None]:
    """The route label of a path, and its repository match when it names one."""
    if path.startswith("/v2/"):
        match = _REPOSITORY_PATH.match(path)
        if match is not None:
            return _KINDS[match["kind"]], match
        if path == "/v2/":
            return "base", None
        if path == "/v2/_catalog":
            return "catalog", None
    if path == "/token" or path.endswith("/token"):
        return "token", None
    return "other", None


@dataclass(frozen=True, slots=True)
class Failure:
    at: float
    method: str
    path: str
    status: int
    message: str


class Activity:
    """What this process saw lately, in bounded memory: the most pulled images and recent errors."""

    def __init__(self, images: int = 1000, errors: int = 50) -> None:
        self.since = time.time()
        self.errors: collections.deque[Failure] = collections.deque(maxlen=errors)
        self._pulls: collections.Counter[str] = collections.Counter()
        self._images = images

    def pulled(self, image: str) -> None:
        self._pulls[image] += 1
        if len(self._pulls) > 2 * self._images:
            # Keep the most pulled: a long tail of one-off images must not grow memory.
            self._pulls = collections.Counter(dict(self._pulls.most_common(self._images)))

    def most_pulled(self, count: int = 10) -> list[tuple[str, int]]:
        return self._pulls.most_common(count)

    def failed(self, failure: Failure) -> None:
        self.errors.appendleft(failure)


class Observe:
    """Counts each request by route and status, and its cache outcome; records pulls and errors."""

    def __init__(self, app: ASGIApp, activity: Activity) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        error: Exception | None = None
        try:
            await self.app(scope, receive, counting_send)
        except Exception as exc:  # a transfer cut short (bad upstream bytes), or a bug
            error = exc
            raise
        finally:
            self._account(scope, status or 500, sent, error)

    def _account(self, scope: Scope, status: int, sent: int, error: Exception | None) -> None:
        route, match = classify(scope["path"])
        metrics.REQUESTS.labels(route, str(status)).inc()
        state = scope.get("state", {})
        outcome = state.get("cache")
        if match is not None and outcome is not None:
            metrics.CACHE_REQUESTS.labels(route, outcome).inc()
            if outcome in FROM_CACHE:
                metrics.CACHE_SERVED_BYTES.labels(route).inc(sent)
            if route == "manifest" and status == 200 and not digests.is_digest(match["reference"]):
                self.activity.pulled(f"{_client_name(scope, match['name'])}:{match['reference']}")
        if (error is not None or status >= 500 or status == 429) and scope["path"].startswith("/v2/"):
            if error is not None:
                message = f"{type(error).__name__} after {sent} bytes were sent: {error}"
            else:
                message = state.get("error") or ""
            self.activity.failed(Failure(time.time(), scope["method"], scope["path"], status, message))


def _client_name(scope: Scope, name: str) -> str:
    """The repository as a person knows it: containerd's `?ns=` registry host in front."""
    ns = parse_qs(scope["query_string"].decode("latin-1")).get("ns")
    return f"{ns[0]}/{name}" if ns else name
