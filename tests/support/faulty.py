"""A fault-injecting fake upstream registry for pull-through mirror tests.

Real registries cannot be told to lie about a blob, cut a response short, stall,
rate-limit, go away or expire a token on cue; this one can. It speaks the read
side of the OCI Distribution API over raw asyncio streams (not an ASGI server) so
that truncation, dropped connections and slow bodies are real socket behaviour,
not simulations an HTTP framework would "fix".

Three listeners, each on its own OS-assigned 127.0.0.1 port:

* ``registry`` (``.url``): ``/v2/`` API, optionally behind Bearer or Basic auth.
* ``token`` (``.token_url``): a Docker Hub-style token service on a separate
  host:port, as auth.docker.io is.
* ``cdn`` (``.cdn_url``): where blobs are redirected to when ``redirect_blobs``
  is on; it records (and by default rejects, like S3) any Authorization header.

Everything runs on one background thread with its own event loop. All knobs and
observers are plain methods callable from the test thread; shared state sits
behind one lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import re
import secrets
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode

Listener = Literal["registry", "token", "cdn"]
AuthMode = Literal["none", "bearer", "basic"]
FaultKind = Literal["status", "drop", "slow", "corrupt", "truncate", "endless"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_XOR_FF = bytes(b ^ 0xFF for b in range(256))
_REASONS = {
    200: "OK",
    206: "Partial Content",
    307: "Temporary Redirect",
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)$")
_TAGS_PATH = re.compile(r"^/v2/(?P<name>.+?)/tags/list$")
_CDN_PATH = re.compile(r"^/blobs/(?P<digest>[^/]+)$")


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pseudo_random_bytes(seed: str, size: int) -> bytes:
    """Deterministic filler so a test's image digests are stable across runs."""
    return random.Random(hashlib.sha256(seed.encode()).digest()).randbytes(size)


class LoggedRequest(NamedTuple):
    """One request as a listener saw it; header names are lower-cased."""

    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass
class Fault:
    """Handle for one injected fault; returned by every knob so a test can inspect or remove it.

    Matching fields that are ``None`` match anything. ``path`` is a substring of the
    decoded request path or a compiled regex searched in it. ``digest`` matches the
    content digest the request resolves to (a tag is resolved, so a manifest-by-tag
    request matches its manifest's digest). ``times`` counts down per hit; ``None``
    means until cleared.
    """

    kind: FaultKind
    method: str | None = None
    path: str | re.Pattern[str] | None = None
    digest: str | None = None
    listener: Listener | None = None
    times: int | None = None
    hits: int = 0
    # kind-specific parameters
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    omit: tuple[str, ...] = ()  # header names left out of the answer, even Content-Length
    body: bytes = b""
    keep: int | None = None
    reset: bool = False
    chunk_size: int = 16384
    chunk_delay: float = 0.0
    header_delay: float = 0.0
    prefix: bytes = b""
    filler: bytes = b""
    total: int = 0
    declare_length: bool = False
    sent: int = 0  # body bytes an "endless" fault got into the socket before the client hung up

    def matches(self, listener: Listener, method: str, path: str, digest: str | None) -> bool:
        """Whether this fault applies to the request described."""
        if self.times is not None and self.times <= 0:
            return False
        if self.listener is not None and self.listener != listener:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.digest is not None and self.digest != digest:
            return False
        if isinstance(self.path, str):
            return self.path in path
        if self.path is not None:
            return self.path.search(path) is not None
        return True


@dataclass
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool

    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    digest: str | None = None  # content digest when the body is registry content

    @classmethod
    def json(cls, status: int, obj: object, headers: dict[str, str] | None = None) -> _Response:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return cls(status, hdrs, json.dumps(obj).encode())

    @classmethod
    def error(cls, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _Response:
        return cls.json(status, {"errors": [{"code": code, "message": message, "detail": None}]}, headers)


@dataclass
class _Token:
    repos: frozenset[str]
    expires_at: float


class FaultyRegistry:
    """Fake upstream registry with runtime fault knobs; use as a context manager.

    ``auth`` ("none" | "bearer" | "basic"), ``credentials`` (Basic mode),
    ``token_credentials`` (Basic creds the token service demands; ``None`` = anonymous
    tokens), ``token_expires_in``, ``redirect_blobs``, ``redirect_status``,
    ``cdn_reject_auth`` and ``tags_page_size`` are plain attributes and may be changed
    at any time, including while running.
    """

    def __init__(
        self,
        *,
        auth: AuthMode = "none",
        credentials: tuple[str, str] = ("user", "secret"),
        token_credentials: tuple[str, str] | None = None,
        token_expires_in: int = 300,
        service: str = "faulty.test",
        redirect_blobs: bool = False,
        redirect_status: int = 307,
        cdn_reject_auth: bool = True,
        tags_page_size: int | None = None,
    ) -> None:
        self.auth: AuthMode = auth
        self.credentials = credentials
        self.token_credentials = token_credentials
        self.token_expires_in = token_expires_in
        self.service = service
        self.redirect_blobs = redirect_blobs
        self.redirect_status = redirect_status
        self.cdn_reject_auth = cdn_reject_auth
        self.tags_page_size = tags_page_size

        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}
        self._manifests: dict[str, dict[str, tuple[bytes, str]]] = {}  # name -> digest -> (body, type)
        self._tags: dict[str, dict[str, str]] = {}  # name -> tag -> digest
        self._faults: list[Fault] = []
        self._tokens: dict[str, _Token] = {}
        self._log: dict[Listener, list[LoggedRequest]] = {"registry": [], "token": [], "cdn": []}
        self._served: Counter[str] = Counter()
        self._cdn_auth: list[str] = []
        self._active: Counter[Listener] = Counter()
        self._total: Counter[Listener] = Counter()
        self._sign_key = secrets.token_bytes(16)

        self._ports: dict[Listener, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FaultyRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start (or restart) all listeners; after the first start the ports never change.

        Restarting rebinds the same ports so a mirror configured with ``.url`` sees the
        upstream come back, as after an outage.
        """
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), name="faulty-registry", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(timeout=10)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        """Simulate the upstream going down: close listeners and abort every open connection.

        Idempotent. New connections are refused until ``start()``.
        """
        if self._thread is None or self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> None:
        try:
            for name in ("registry", "token", "cdn"):
                server = await asyncio.start_server(
                    lambda r, w, n=name: self._accept(n, r, w), "127.0.0.1", self._ports.get(name, 0)
                )
                self._servers.append(server)
                self._ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>`` of the registry listener (what a mirror config names)."""
        return f"127.0.0.1:{self._port('registry')}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def token_url(self) -> str:
        """The Bearer realm, on its own port."""
        return f"http://127.0.0.1:{self._port('token')}/token"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._port('cdn')}"

    def _port(self, listener: Listener) -> int:
        if listener not in self._ports:
            raise RuntimeError("FaultyRegistry has never been started")
        return self._ports[listener]

    # ------------------------------------------------------------------ content

    def add_blob(self, data: bytes) -> str:
        """Store a blob (visible under every repository name); returns its digest."""
        digest = sha256_digest(data)
        with self._lock:
            self._blobs[digest] = data
        return digest

    def add_manifest(self, name: str, tag: str | None, body: bytes, media_type: str) -> str:
        """Store a manifest in ``name``; a given ``tag`` is (re)pointed at it. Returns its digest."""
        digest = sha256_digest(body)
        with self._lock:
            self._manifests.setdefault(name, {})[digest] = (body, media_type)
            self._tags.setdefault(name, {})
            if tag is not None:
                self._tags[name][tag] = digest
        return digest

    def add_image(self, name: str, tag: str | None, layer_sizes: Sequence[int] = (1024,)) -> tuple[str, list[str]]:
        """Store a single-platform OCI image of pseudo-random layers.

        Returns ``(manifest_digest, [config_digest, *layer_digests])``. Content is
        derived from ``name``, ``tag`` and sizes only, so it is stable across runs.
        """
        seed = f"{name}:{tag}"
        layers = [pseudo_random_bytes(f"{seed}:{i}:{n}", n) for i, n in enumerate(layer_sizes)]
        layer_digests = [self.add_blob(data) for data in layers]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"faulty.seed": seed}},
                "rootfs": {"type": "layers", "diff_ids": layer_digests},
            },
            sort_keys=True,
        ).encode()
        config_digest = self.add_blob(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": d, "size": len(b)}
                for d, b in zip(layer_digests, layers, strict=True)
            ],
        }
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        return self.add_manifest(name, tag, body, OCI_MANIFEST), [config_digest, *layer_digests]

    def add_index(self, name: str, tag: str | None, manifest_digests: Iterable[str]) -> str:
        """Store an OCI image index over manifests already in ``name``; returns its digest."""
        entries = []
        with self._lock:
            stored = self._manifests.get(name, {})
            for i, d in enumerate(manifest_digests):
                body, media_type = stored[d]
                platform = {"architecture": ["amd64", "arm64", "s390x", "ppc64le"][i % 4], "os": "linux"}
                entries.append({"mediaType": media_type, "digest": d, "size": len(body), "platform": platform})
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=2).encode()
        return self.add_manifest(name, tag, body, OCI_INDEX)

    def delete_tag(self, name: str, tag: str) -> None:
        """Remove a tag (its manifest stays reachable by digest)."""
        with self._lock:
            self._tags.get(name, {}).pop(tag, None)

    def blob(self, digest: str) -> bytes:
        """The true bytes of a stored blob, for comparing against what a mirror served."""
        with self._lock:
            return self._blobs[digest]

    # ------------------------------------------------------------------ fault knobs

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail(
        self,
        status: int,
        *,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        digest: str | None = None,
        listener: Listener | None = None,
        times: int | None = None,
        retry_after: int | str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        omit: Sequence[str] = (),
    ) -> Fault:
        """Answer matching requests with ``status`` (before auth or routing).

        A 429 without ``retry_after`` carries ``Retry-After: 1``, as real rate limits do.
        ``omit`` names headers to leave out, e.g. Content-Length of a HEAD answer.
        """
        hdrs = dict(headers or {})
        if retry_after is None and status == 429:
            retry_after = 1
        if retry_after is not None:
            hdrs["Retry-After"] = str(retry_after)
        if body is None:
            code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE" if status == 503 else "UNKNOWN"
            body = json.dumps({"errors": [{"code": code, "message": f"injected {status}"}]}).encode()
            hdrs.setdefault("Content-Type", "application/json")
        fault = Fault("status", method, path, digest, listener, times, status=status, headers=hdrs, body=body)
        fault.omit = tuple(omit)
        return self._add(fault)

    def drop(
        self,
        *,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        digest: str | None = None,
        listener: Listener | None = None,
        times: int | None = None,
        reset: bool = True,
    ) -> Fault:
        """Read the request, then close the connection without any response (RST unless ``reset=False``)."""
        return self._add(Fault("drop", method, path, digest, listener, times, reset=reset))

    def slow(
        self,
        *,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        digest: str | None = None,
        listener: Listener | None = None,
        times: int | None = None,
        bytes_per_sec: float | None = None,
        chunk_size: int = 16384,
        chunk_delay: float = 0.0,
        header_delay: float = 0.0,
    ) -> Fault:
        """Delay response headers by ``header_delay`` s, then send the body in ``chunk_size`` pieces.

        Between pieces sleep ``chunk_delay`` s, or ``chunk_size / bytes_per_sec`` if given.
        """
        if bytes_per_sec is not None:
            chunk_delay = chunk_size / bytes_per_sec
        return self._add(
            Fault(
                "slow",
                method,
                path,
                digest,
                listener,
                times,
                chunk_size=chunk_size,
                chunk_delay=chunk_delay,
                header_delay=header_delay,
            )
        )

    def corrupt(
        self,
        digest: str | None = None,
        *,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        listener: Listener | None = None,
        times: int | None = None,
    ) -> Fault:
        """Serve every body byte XOR 0xFF: same length, same headers (incl. the true digest), wrong bytes.

        Applies to 2xx GET bodies only (so HEAD does not use up ``times``); works with
        Range requests and through the CDN. Zero-length content cannot be corrupted.
        """
        return self._add(Fault("corrupt", method, path, digest, listener, times))

    def truncate(
        self,
        digest: str | None = None,
        *,
        keep: int | None = None,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        listener: Listener | None = None,
        times: int | None = None,
        reset: bool = False,
    ) -> Fault:
        """Declare the full Content-Length, send only ``keep`` body bytes (default half), then close.

        The close is a FIN after the partial bytes are flushed, so the client reliably
        receives exactly ``keep`` bytes and then an incomplete-body error. ``reset=True``
        sends RST instead (the client may then see fewer bytes). 2xx GET bodies only.
        """
        return self._add(Fault("truncate", method, path, digest, listener, times, keep=keep, reset=reset))

    def endless(
        self,
        *,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        listener: Listener | None = None,
        times: int | None = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
        prefix: bytes = b"",
        filler: bytes = b"x" * 4096,
        total: int = 64 << 20,
        declare_length: bool = False,
    ) -> Fault:
        """Answer ``status`` with a body that does not end: ``prefix``, then ``filler`` again and again.

        Chunked, so the client cannot tell its size (or with ``Content-Length: total`` if
        ``declare_length``). Bounded by ``total`` bytes so a test cannot run away; the
        fault's ``sent`` counts what went into the socket before the client hung up.
        """
        return self._add(
            Fault(
                "endless",
                method,
                path,
                None,
                listener,
                times,
                status=status,
                headers=dict(headers or {}),
                prefix=prefix,
                filler=filler,
                total=total,
                declare_length=declare_length,
            )
        )

    def remove_fault(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def invalidate_tokens(self) -> None:
        """Forget every issued token, so the next request with one gets 401 ``invalid_token``."""
        with self._lock:
            self._tokens.clear()

    def _take(self, kind: FaultKind, listener: Listener, method: str, path: str, digest: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.matches(listener, method, path, digest):
                    fault.hits += 1
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    # ------------------------------------------------------------------ observation

    def requests(self, listener: Listener = "registry") -> list[LoggedRequest]:
        """Snapshot of the requests ``listener`` received, in arrival order."""
        with self._lock:
            return list(self._log[listener])

    def count(self, method: str | None = None, path_contains: str = "", listener: Listener = "registry") -> int:
        """Requests on ``listener`` with ``method`` (``None`` = any) whose path contains the substring."""
        with self._lock:
            return sum(
                1
                for r in self._log[listener]
                if (method is None or r.method == method.upper()) and path_contains in r.path
            )

    def gets(self, digest: str) -> int:
        """How many 2xx GET bodies (full or ranged, on the registry or the CDN) served this content.

        A redirected blob pull counts once (at the CDN), a manifest pulled by tag counts
        under its digest. Faulted bodies (corrupt/truncated) count too.
        """
        with self._lock:
            return self._served[digest]

    def cdn_authorization_headers(self) -> list[str]:
        """Authorization header values that reached the CDN; a correct client sends none."""
        with self._lock:
            return list(self._cdn_auth)

    def active_connections(self, listener: Listener | None = None) -> int:
        """Currently open TCP connections on one listener, or all of them."""
        with self._lock:
            return self._active[listener] if listener else sum(self._active.values())

    def total_connections(self, listener: Listener | None = None) -> int:
        """Connections accepted since start or the last ``reset_log()``."""
        with self._lock:
            return self._total[listener] if listener else sum(self._total.values())

    def reset_log(self) -> None:
        """Clear request logs, served counts, CDN auth records and total-connection counts."""
        with self._lock:
            for entries in self._log.values():
                entries.clear()
            self._served.clear()
            self._cdn_auth.clear()
            self._total.clear()

    # ------------------------------------------------------------------ connection handling

    def _accept(self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._connection(listener, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._active[listener] += 1
            self._total[listener] += 1
        self._writers.add(writer)
        try:
            while True:
                req = await _read_request(reader)
                if req is None or not await self._exchange(listener, req, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            with self._lock:
                self._active[listener] -= 1
            if not writer.is_closing():
                writer.close()  # graceful: flushes a final "Connection: close" response
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _exchange(self, listener: Listener, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request, applying faults; returns whether the connection stays open."""
        with self._lock:
            self._log[listener].append(LoggedRequest(req.method, req.path, req.query, dict(req.headers)))
            if listener == "cdn" and "authorization" in req.headers:
                self._cdn_auth.append(req.headers["authorization"])
        digest = self._resolve_digest(listener, req.path)
        where = (listener, req.method, req.path, digest)

        slow = self._take("slow", *where)
        if slow and slow.header_delay:
            await asyncio.sleep(slow.header_delay)
        drop = self._take("drop", *where)
        if drop:
            _hard_close(writer, reset=drop.reset)
            return False
        endless = self._take("endless", *where)
        if endless:
            await self._endless(endless, req, writer)
            return False
        status = self._take("status", *where)
        if status:
            resp = _Response(status.status, dict(status.headers), status.body)
        elif listener == "registry":
            resp = self._registry(req)
        elif listener == "token":
            resp = self._token(req)
        else:
            resp = self._cdn(req)

        body = resp.body
        truncate = None
        if req.method == "GET" and 200 <= resp.status < 300 and body and resp.digest:
            where = (listener, req.method, req.path, resp.digest)
            if self._take("corrupt", *where):
                body = body.translate(_XOR_FF)
            truncate = self._take("truncate", *where)
            with self._lock:
                self._served[resp.digest] += 1

        keep_alive = req.keep_alive and truncate is None
        head = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}"]
        headers = {"Content-Length": str(len(resp.body)), **resp.headers}
        for name in status.omit if status else ():
            headers.pop(name, None)
        if not keep_alive:
            headers["Connection"] = "close"
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if req.method == "HEAD":
            body = b""
        if truncate:
            body = body[: len(body) // 2 if truncate.keep is None else truncate.keep]

        if slow and slow.chunk_delay and body:
            await writer.drain()
            for offset in range(0, len(body), slow.chunk_size):
                if offset:
                    await asyncio.sleep(slow.chunk_delay)
                writer.write(body[offset : offset + slow.chunk_size])
                await writer.drain()
        else:
            writer.write(body)
        if truncate:
            writer.transport.set_write_buffer_limits(high=0)
            await writer.drain()  # everything kept is in the kernel before we close
            _hard_close(writer, reset=truncate.reset)
            return False
        await writer.drain()
        return keep_alive

    async def _endless(self, fault: Fault, req: _Request, writer: asyncio.StreamWriter) -> None:
        head = [f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Status')}", "Connection: close"]
        framing = f"Content-Length: {fault.total}" if fault.declare_length else "Transfer-Encoding: chunked"
        head += [framing, *(f"{k}: {v}" for k, v in fault.headers.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if req.method == "HEAD":
            await writer.drain()
            return
        piece = fault.prefix or fault.filler
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < fault.total:
                piece = piece[: fault.total - sent]
                writer.write(piece if fault.declare_length else b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                sent += len(piece)
                with self._lock:
                    fault.sent = sent
                piece = fault.filler
            if not fault.declare_length:
                writer.write(b"0\r\n\r\n")
            await writer.drain()

    def _resolve_digest(self, listener: Listener, path: str) -> str | None:
        """The content digest a request targets, so digest-keyed faults also catch by-tag pulls."""
        if listener == "cdn":
            m = _CDN_PATH.match(path)
            return m["digest"] if m else None
        m = _REPO_PATH.match(path) if listener == "registry" else None
        if not m or m["kind"] == "referrers":
            return None
        ref = m["ref"]
        if m["kind"] == "manifests" and not ref.startswith("sha256:"):
            with self._lock:
                return self._tags.get(m["name"], {}).get(ref)
        return ref

    # ------------------------------------------------------------------ registry routes

    def _registry(self, req: _Request) -> _Response:
        if req.method not in ("GET", "HEAD"):
            return _Response.error(405, "UNSUPPORTED", "read-only registry")
        repo_m = _REPO_PATH.match(req.path)
        tags_m = _TAGS_PATH.match(req.path)
        name = repo_m["name"] if repo_m else tags_m["name"] if tags_m else None
        if req.path not in ("/v2", "/v2/") and name is None:
            return _Response.error(404, "NOT_FOUND", "no such route")
        denied = self._check_auth(req, name)
        if denied:
            return denied
        api = {"Docker-Distribution-API-Version": "registry/2.0"}
        if name is None:
            return _Response.json(200, {}, api)
        if tags_m:
            return self._tags_list(name, req, api)
        assert repo_m is not None
        kind, ref = repo_m["kind"], repo_m["ref"]
        if kind == "referrers":
            return _Response.error(404, "NOT_FOUND", "referrers API not supported", api)
        if kind == "manifests":
            return self._manifest(name, ref, api)
        return self._blob(ref, req, api, redirect=self.redirect_blobs)

    def _check_auth(self, req: _Request, name: str | None) -> _Response | None:
        auth_header = req.headers.get("authorization", "")
        if self.auth == "basic":
            if _basic_ok(auth_header, self.credentials):
                return None
            return _Response.error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                {"WWW-Authenticate": 'Basic realm="faulty.test"'},
            )
        if self.auth != "bearer":
            return None
        challenge = f'Bearer realm="{self.token_url}",service="{self.service}"'
        if name is not None:
            challenge += f',scope="repository:{name}:pull"'
        if not auth_header.startswith("Bearer "):
            return _Response.error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})
        with self._lock:
            token = self._tokens.get(auth_header[len("Bearer ") :].strip())
        if token is None or token.expires_at <= time.monotonic():
            return _Response.error(
                401,
                "UNAUTHORIZED",
                "invalid or expired token",
                {"WWW-Authenticate": challenge + ',error="invalid_token"'},
            )
        if name is not None and name not in token.repos:
            return _Response.error(
                401,
                "DENIED",
                f"token not valid for repository:{name}:pull",
                {"WWW-Authenticate": challenge + ',error="insufficient_scope"'},
            )
        return None

    def _tags_list(self, name: str, req: _Request, api: dict[str, str]) -> _Response:
        with self._lock:
            if name not in self._tags:
                return _Response.error(404, "NAME_UNKNOWN", f"repository {name} not known", api)
            tags = sorted(self._tags[name])
        params = req.params()
        last = params.get("last", [""])[0]
        n_param = params.get("n", [""])[0]
        limit = int(n_param) if n_param.isdigit() else None
        if self.tags_page_size is not None:
            limit = min(limit, self.tags_page_size) if limit is not None else self.tags_page_size
        remaining = [t for t in tags if t > last] if last else tags
        page = remaining if limit is None else remaining[:limit]
        headers = dict(api)
        if limit is not None and len(remaining) > len(page) and page:
            query = urlencode({"n": limit, "last": page[-1]})
            headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
        return _Response.json(200, {"name": name, "tags": page}, headers)

    def _manifest(self, name: str, ref: str, api: dict[str, str]) -> _Response:
        with self._lock:
            if name not in self._manifests:
                return _Response.error(404, "NAME_UNKNOWN", f"repository {name} not known", api)
            digest = ref if ref.startswith("sha256:") else self._tags[name].get(ref)
            found = self._manifests[name].get(digest) if digest else None
        if digest is None or found is None:
            return _Response.error(404, "MANIFEST_UNKNOWN", f"manifest {ref} not known", api)
        body, media_type = found
        headers = {**api, "Content-Type": media_type, "Docker-Content-Digest": digest, "ETag": f'"{digest}"'}
        return _Response(200, headers, body, digest)

    def _blob(self, digest: str, req: _Request, base: dict[str, str], *, redirect: bool) -> _Response:
        with self._lock:
            data = self._blobs.get(digest)
        if data is None:
            return _Response.error(404, "BLOB_UNKNOWN", f"blob {digest} not known", base)
        if redirect:
            expires = str(int(time.time()) + 600)
            query = urlencode({"expires": expires, "sig": self._sign(digest, expires)})
            location = f"{self.cdn_url}/blobs/{quote(digest, safe=':')}?{query}"
            return _Response(self.redirect_status, {**base, "Location": location})
        headers = {
            **base,
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
        span = _parse_range(req.headers.get("range"), len(data))
        if span == "unsatisfiable":
            return _Response(416, {**headers, "Content-Range": f"bytes */{len(data)}"})
        if span is None:
            return _Response(200, headers, data, digest)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(206, headers, data[start : end + 1], digest)

    # ------------------------------------------------------------------ token service and CDN

    def _token(self, req: _Request) -> _Response:
        if req.path != "/token":
            return _Response.json(404, {"details": "not found"})
        if req.method != "GET":
            return _Response.json(405, {"details": "only GET token requests are supported"})
        auth_header = req.headers.get("authorization", "")
        if self.token_credentials is not None and not _basic_ok(auth_header, self.token_credentials):
            return _Response.json(
                401,
                {"details": "incorrect username or password"},
                {"WWW-Authenticate": 'Basic realm="faulty token service"'},
            )
        params = req.params()
        if params.get("service", [""])[0] != self.service:
            return _Response.json(400, {"details": f"service must be {self.service!r}"})
        repos: set[str] = set()
        for scope in (s for value in params.get("scope", []) for s in value.split()):
            parts = scope.split(":")
            if len(parts) < 3 or not parts[1]:
                return _Response.json(400, {"details": f"malformed scope {scope!r}"})
            actions = parts[-1].split(",")
            if parts[0] == "repository" and ("pull" in actions or "*" in actions):
                repos.add(":".join(parts[1:-1]))
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = _Token(frozenset(repos), time.monotonic() + self.token_expires_in)
        issued = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return _Response.json(
            200,
            {"token": token, "access_token": token, "expires_in": self.token_expires_in, "issued_at": issued},
        )

    def _sign(self, digest: str, expires: str) -> str:
        return hmac.new(self._sign_key, f"{digest}|{expires}".encode(), "sha256").hexdigest()

    def _cdn(self, req: _Request) -> _Response:
        m = _CDN_PATH.match(req.path)
        if not m or req.method not in ("GET", "HEAD"):
            return _Response(404, {"Content-Type": "text/plain"}, b"not found")
        if self.cdn_reject_auth and "authorization" in req.headers:
            # S3 behaviour: a presigned URL plus an Authorization header is an error.
            return _Response(400, {"Content-Type": "text/plain"}, b"Only one auth mechanism allowed")
        params = req.params()
        expires, sig = params.get("expires", [""])[0], params.get("sig", [""])[0]
        good = hmac.compare_digest(sig, self._sign(m["digest"], expires))
        if not good or not expires.isdigit() or int(expires) < time.time():
            return _Response(403, {"Content-Type": "text/plain"}, b"bad or expired signature")
        return self._blob(m["digest"], req, {}, redirect=False)


# ---------------------------------------------------------------------- HTTP plumbing


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """Parse one HTTP/1.1 request; ``None`` on a clean close between requests."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    lines = raw.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    body = b""
    if headers.get("content-length", "0").isdigit() and int(headers.get("content-length", "0")):
        body = await reader.readexactly(int(headers["content-length"]))
    raw_path, _, query = target.partition("?")
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return _Request(method.upper(), unquote(raw_path), query, headers, body, keep_alive)


def _hard_close(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close now; with ``reset`` the kernel sends RST (SO_LINGER 0) instead of FIN."""
    sock = writer.get_extra_info("socket")
    if reset and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _basic_ok(header: str, creds: tuple[str, str]) -> bool:
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, creds[0]) and hmac.compare_digest(password, creds[1])


def _parse_range(value: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """Single ``bytes=`` range -> inclusive (start, end); multi-range or junk is ignored (full 200)."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix range: last N bytes
        n = int(m[2])
        return (max(size - n, 0), size - 1) if n and size else "unsatisfiable"
    start = int(m[1])
    end = min(int(m[2]), size - 1) if m[2] else size - 1
    if start >= size or (m[2] and int(m[2]) < start):
        return "unsatisfiable"
    return start, end
