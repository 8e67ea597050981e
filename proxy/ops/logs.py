"""Logging: structlog, JSON when not on a terminal, and one line per request."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.record import record_of


def configure(log_format: str = "auto") -> None:
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        # One write per line: print() writes the newline apart, and workers sharing a log file
        # (unbuffered, as under PYTHONUNBUFFERED) could then run two lines together.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


Listener = Callable[[Scope, int, int, "Exception | None"], None]


class AccessLog:
    """Pure ASGI middleware: one log line per request (method, path, status, bytes, time, cache).

    It is the one wrapper around `send` that sees every request's outcome, so the metrics
    listen here too (`listeners`) instead of wrapping `send` a second time. It creates the
    request's `RequestRecord`, which handlers fill in and the line and the listeners read.
    """

    def __init__(self, app: ASGIApp, listeners: Sequence[Listener] = ()) -> None:
        self.app = app
        self.listeners = tuple(listeners)
        self.log = structlog.get_logger("pullproxy.access").bind(pid=os.getpid())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = record_of(scope)  # created here, so handlers and listeners share this one
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.zerocopysend":  # the file bytes of proxy.http.sendfile
                sent += message["count"]
            await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, counting_send)
        except BaseException as exc:  # the body was cut short on purpose (bad upstream bytes) or by the client
            failure = exc
            raise
        finally:
            client = scope.get("client")
            self.log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                query=scope["query_string"].decode("latin-1") or None,
                status=status or 500,
                bytes=sent,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                cache=record.outcome,
                user=record.user,
                client=client[0] if client else None,
                **({"aborted": True} if failure is not None else {}),
            )
            error = failure if isinstance(failure, Exception) else None  # not a client hanging up
            for listener in self.listeners:
                listener(scope, status or 500, sent, error)
