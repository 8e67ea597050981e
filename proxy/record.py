"""What handlers learn about a request that the access log and the metrics report afterwards.

One typed record per request, kept in the ASGI scope under one key: handlers, the access
check and the error handlers write it, the access log middleware and its listeners read
it once the response is done. The scope is the one object all of them share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import Scope

if TYPE_CHECKING:
    from proxy.mirror.outcome import Outcome

SCOPE_KEY = "pullproxy.request"


@dataclass(slots=True)
class RequestRecord:
    outcome: Outcome | None = None  # how the cache answered (registry endpoints only)
    user: str | None = None  # who the credentials named, for the access log
    error: str | None = None  # the registry error's message, for the status page's recent errors


def record_of(scope: Scope) -> RequestRecord:
    """The request's record, created by whichever asks first (the access log, as a rule)."""
    found: RequestRecord | None = scope.get(SCOPE_KEY)
    if found is None:
        found = scope[SCOPE_KEY] = RequestRecord()
    return found
