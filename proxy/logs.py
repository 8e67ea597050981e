"""Logging: structlog, JSON when not on a terminal, and one line per request."""

from __future__ import annotations

import logging
import os
import sys
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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


class AccessLog:
    """Pure ASGI middleware (no per-request wrapping objects): method, path, status, bytes, time, cache."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = structlog.get_logger("pullproxy.access").bind(pid=os.getpid())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        aborted = False
        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            aborted = True  # the body was cut short on purpose (bad upstream bytes) or by the client
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
                cache=scope.get("state", {}).get("cache"),
                user=scope.get("state", {}).get("user"),
                client=client[0] if client else None,
                **({"aborted": True} if aborted else {}),
            )
