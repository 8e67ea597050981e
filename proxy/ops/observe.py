"""Per-request accounting: the request and cache counters, and the status page's recent history.

A listener of the access log middleware (`proxy.ops.logs.AccessLog`): per request it
classifies the path into a route of bounded cardinality (`proxy.paths.classify`), reads
the request's record (`proxy.record`) and increments two or three counters; nothing
else on the hot path. Most pulled images and recent errors are kept in bounded memory,
per process.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.types import Scope

from cache import digests
from proxy.ops import metrics
from proxy.paths import Endpoint, classify
from proxy.record import record_of


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

    def __init__(self, activity: Activity) -> None:
        self.activity = activity
        self._requests = metrics.Children(metrics.REQUESTS)
        self._cache = metrics.Children(metrics.CACHE_REQUESTS)
        self._served = metrics.Children(metrics.CACHE_SERVED_BYTES)

    def __call__(self, scope: Scope, status: int, sent: int, error: Exception | None) -> None:
        route, name, reference = classify(scope["path"])
        self._requests(route, status).inc()
        record = record_of(scope)
        outcome = record.outcome
        if name and outcome is not None:
            self._cache(route, outcome).inc()
            if outcome.from_cache:
                self._served(route).inc(sent)
            if route is Endpoint.MANIFEST and status == 200 and not digests.is_digest(reference):
                self.activity.pulled(f"{_client_name(scope, name)}:{reference}")
        if (error is not None or status >= 500 or status == 429) and scope["path"].startswith("/v2/"):
            if error is not None:
                message = f"{type(error).__name__} after {sent} bytes were sent: {error}"
            else:
                message = record.error or ""
            self.activity.failed(Failure(time.time(), scope["method"], scope["path"], status, message))


def _client_name(scope: Scope, name: str) -> str:
    """The repository as a person knows it: containerd's `?ns=` registry host in front."""
    ns = parse_qs(scope["query_string"].decode("latin-1")).get("ns")
    return f"{ns[0]}/{name}" if ns else name
