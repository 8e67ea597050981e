"""The typed request record: written by handlers, the access check and the error handler;
read by the access log line and its listeners. In-process, over httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope
from structlog.testing import capture_logs

from proxy import errors
from proxy.access.gate import _log_user
from proxy.access.policy import User
from proxy.http.app import _registry_error
from proxy.http.registry import _outcome
from proxy.mirror.outcome import Outcome
from proxy.ops.logs import AccessLog
from proxy.record import SCOPE_KEY, RequestRecord, record_of


def test_the_record_is_made_once_per_scope_and_starts_empty() -> None:
    scope: Scope = {"type": "http"}
    record = record_of(scope)
    assert record == RequestRecord(outcome=None, user=None, error=None)
    assert record_of(scope) is record and scope[SCOPE_KEY] is record
    assert record_of({"type": "http"}) is not record
    assert not hasattr(record, "__dict__")  # slotted: a misspelt field cannot be set


def _app(seen: list[RequestRecord]) -> Starlette:
    async def answered(request: Request) -> Response:
        _log_user(request, User("alice"))
        _outcome(request, Outcome.STALE)
        return Response(b"ok")

    async def failed(request: Request) -> Response:
        _log_user(request, User("bob"))
        raise errors.unavailable("docker.io: answered 503")

    def listener(scope: Scope, status: int, sent: int, error: Exception | None) -> None:
        seen.append(record_of(scope))

    return Starlette(
        routes=[Route("/answered", answered), Route("/failed", failed)],
        middleware=[Middleware(AccessLog, listeners=[listener])],
        exception_handlers={errors.RegistryError: _registry_error},
    )


def test_handler_writes_reach_the_access_log_line_and_the_listeners() -> None:
    seen: list[RequestRecord] = []

    async def requests() -> list[int]:
        transport = httpx.ASGITransport(app=_app(seen))
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.test") as client:
            return [(await client.get(path)).status_code for path in ("/answered", "/failed")]

    with capture_logs() as lines:
        assert asyncio.run(requests()) == [200, 503]

    assert seen == [
        RequestRecord(outcome=Outcome.STALE, user="alice", error=None),
        RequestRecord(outcome=None, user="bob", error="docker.io: answered 503"),
    ]
    logged = [(line["path"], line["cache"], line["user"]) for line in lines if line.get("event") == "request"]
    assert logged == [("/answered", Outcome.STALE, "alice"), ("/failed", None, "bob")]
    assert json.dumps(logged[0][1]) == '"stale"'  # as the JSON log line spells it
