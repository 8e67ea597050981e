"""One upstream registry: its HTTP client, credentials, and the few requests a mirror makes.

Each upstream has its own connection pool and timeouts, so one that is down or slow
never holds up requests for the others. Failures are sorted into what the mirror acts
on: not found, refused, or unavailable (unreachable, timed out, 5xx, 429) — the last
being when a cached answer may be served stale. A failing upstream is backed off from,
so requests meanwhile fail at once instead of each waiting for a timeout. No body is
read whole beyond a limit per kind, and redirects are followed for blobs only. A blob's
body is read off the event loop: its GET goes through `upstream.threaded`, and the download
that fetches it reads the body blockingly on a thread of its own (`cache.flight`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qs, urlsplit

import httpcore
import httpx
import structlog

from cache.flight import BlockingSource, Source
from cache.mediatypes import OCI_INDEX, UPSTREAM_ACCEPT
from proxy import tls, units
from proxy.config import UpstreamConfig
from proxy.ops import metrics
from proxy.paths import SEGMENT_OF, classify
from proxy.upstream.auth import RealmRefused, RegistryAuth, scope_for
from proxy.upstream.egress import Egress, same_origin
from proxy.upstream.threaded import ThreadedTransport, blocking_body, body_chunks

log = structlog.get_logger("pullproxy")

# Bodies read whole, each up to a limit: whatever an upstream sends, a request holds no more.
MAX_MANIFEST_SIZE = 4 << 20  # what registries accept on push, and the OCI spec suggests
MAX_REFERRERS_SIZE = 4 << 20  # a referrers answer is an image index, so a manifest
MAX_TAGS_SIZE = 8 << 20  # about 200,000 tags of usual length, in one tags/list page
MAX_TOKEN_SIZE = 1 << 20  # a token answer is a few KiB even with a large JWT

MAX_REDIRECTS = 5  # Docker Hub, ghcr.io, ECR and Quay redirect a blob once, to their CDN or storage

# While an upstream fails, it is not asked for a window that starts at BACKOFF_FIRST seconds
# and doubles up to BACKOFF_MAX: a request is refused at once (a tag is then served stale)
# and one `GET /v2/` probes it when the window ends. Unreachable or timed out opens the
# window at once; answers of 5xx or 429 only after FAILED_ANSWERS_BEFORE_BACKOFF in a row,
# as one such answer costs no waiting and may be a single bad path.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
FAILED_ANSWERS_BEFORE_BACKOFF = 3

# httpcore reads a response body 64 KiB per call, each call paying for a timeout scope;
# blobs are large, so let one call take what one transport read delivers (up to 256 KiB).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 256 << 10


class Kind(StrEnum):
    """What a request to an upstream asks for: it decides the body limit and whether a redirect is followed."""

    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags/list"
    REFERRERS = "referrers"
    TOKEN = "token"


BODY_LIMITS = {
    Kind.MANIFEST: MAX_MANIFEST_SIZE,
    Kind.REFERRERS: MAX_REFERRERS_SIZE,
    Kind.TAGS: MAX_TAGS_SIZE,
    Kind.TOKEN: MAX_TOKEN_SIZE,
}
REDIRECTED = frozenset({Kind.BLOB})  # GET and HEAD: distribution redirects both to its storage


class UpstreamError(Exception):
    def __init__(self, upstream: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{upstream}: {message}")
        self.status = status


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamDenied(UpstreamError):
    pass


class UpstreamTooLarge(UpstreamError):
    """A body over its kind's limit: the transfer was cut off and nothing kept."""


class UpstreamRedirectRefused(UpstreamError):
    """A redirect where none is expected, or to where the mirror may not go."""


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, 5xx or 429: the cases where a stale answer beats none."""

    def __init__(self, upstream: str, message: str, status: int | None = None, retry_after: str | None = None):
        super().__init__(upstream, message, status)
        self.retry_after = retry_after


class UpstreamOffline(UpstreamUnavailable):
    """`[cache] offline = true`: nothing is sent, so an air-gapped mirror makes no connection attempts."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "not contacted in offline mode", 503)


class UpstreamBackingOff(UpstreamUnavailable):
    """Not contacted: it failed just now, and is probed in the background until it answers."""


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes
    content_type: str | None
    digest: str | None  # as the upstream's Docker-Content-Digest header claims


@dataclass(frozen=True, slots=True)
class TagPage:
    name: str
    tags: list[str]
    next_query: dict[str, str] | None  # n/last of the next page, from the upstream's Link


@dataclass(frozen=True, slots=True)
class RangeSource:
    """An upstream's 206 answer to a one-range blob GET, ready to stream."""

    start: int
    end: int  # inclusive
    size: int  # the whole blob's, from Content-Range
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18})")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


class Upstream:
    def __init__(
        self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None, offline: bool = False
    ) -> None:
        self.config = config
        self.name = config.name
        self.offline = offline
        self.egress = Egress(config.url)
        self.auth = RegistryAuth(self.egress, config.username, config.password)
        limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=32)
        verify = tls.upstream_context(config)  # the system's trust store, ca_file, client_cert
        self.client = httpx.AsyncClient(
            base_url=config.url,
            follow_redirects=False,  # `_follow` decides, per kind and target
            timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
            limits=limits,
            headers={"User-Agent": "pullproxy/0.1", "Accept-Encoding": "identity"},
            transport=transport,
            verify=verify,
        )
        # Blob GETs: the same requests, sent from threads, so a download's thread can read the body.
        # An in-process transport (tests) keeps them on the loop.
        self.blob_client = self.client
        if transport is None:
            self.blob_client = httpx.AsyncClient(
                follow_redirects=False,
                transport=ThreadedTransport(
                    httpx.HTTPTransport(verify=verify, limits=limits),
                    ThreadPoolExecutor(config.max_connections, thread_name_prefix=f"upstream {config.name}"),
                ),
            )
        self.last_ok: float | None = None
        self.last_error: tuple[float, str] | None = None
        self.metrics = metrics.for_upstream(config.name)
        self._streak = 0  # 5xx/429 answers in a row
        self._windows = 0  # backoff windows in a row, for the doubling
        self._retry_at: float | None = None  # monotonic end of the backoff window; None: not backing off
        self._backoff_why = ""
        self._rate_limited = False
        self._prober: asyncio.Task[None] | None = None

    # -- sending -----------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        kind: Kind,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        """Send (with `client`, by default `self.client`), mapping every failure to an `UpstreamError`;
        the body is left open (close it)."""
        if self.offline:
            raise UpstreamOffline(self.name)
        self._refuse_while_backing_off()
        request = self.client.build_request(method, path, headers=headers, params=params)
        started = time.perf_counter()
        try:
            response = await self._exchange(request, kind, client or self.client)
        except (httpx.HTTPError, ssl.SSLError) as exc:  # a TLS alert after the handshake comes as SSLError
            why = tls.explain_failure(exc, self.config)
            self._failed(method, path, why or type(exc).__name__)
            self._back_off(why or type(exc).__name__)
            raise UpstreamUnavailable(self.name, why or f"unreachable ({type(exc).__name__})") from exc
        except RealmRefused as exc:
            raise UpstreamError(self.name, str(exc)) from None
        finally:
            self.metrics.seconds.observe(time.perf_counter() - started)
        status = response.status_code
        if status == 429 or status >= 500:
            await response.aclose()
            retry_after = response.headers.get("Retry-After")
            self._failed(method, path, str(status))
            self._back_off(str(status), answered=status, retry_after=retry_after)
            raise UpstreamUnavailable(self.name, f"answered {status}", status, retry_after)
        self._answered()
        if status < 400:
            self.last_ok = time.time()
            return response
        await response.aclose()
        if status == 404:
            raise UpstreamNotFound(self.name, f"{path} not found", status)
        if status in (401, 403):
            raise UpstreamDenied(self.name, f"{method} {path} refused with {status}", status)
        raise UpstreamError(self.name, f"{method} {path} answered {status}", status)

    async def _exchange(self, request: httpx.Request, kind: Kind, client: httpx.AsyncClient) -> httpx.Response:
        """One request with authentication: a 401 is answered once (its body never read), then redirects."""
        scope = scope_for(request.url.path) or ""
        sent = self.auth.authorize(request, scope)
        response = await client.send(request, stream=True)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            await response.aclose()
            if await self.auth.answer(request, challenge, scope, sent, self._fetch_token):
                response = await client.send(request, stream=True)
        return await self._follow(request, response, kind, client)

    async def _follow(
        self, request: httpx.Request, response: httpx.Response, kind: Kind, client: httpx.AsyncClient
    ) -> httpx.Response:
        """Follow the redirects of a blob request, each target checked (see `upstream.egress`); refuse others'.

        The registry's Authorization goes to the same origin only (Docker Hub's CDN refuses it).
        Redirect bodies are never read.
        """
        hops = 0
        while response.has_redirect_location:
            await response.aclose()
            try:
                target = response.url.join(response.headers["Location"])
            except httpx.InvalidURL:
                raise UpstreamRedirectRefused(self.name, f"a {kind} request was redirected to an invalid URL") from None
            if kind not in REDIRECTED:
                raise UpstreamRedirectRefused(
                    self.name, f"a {kind} request was answered with a redirect (to {target.host}), which only blobs get"
                )
            hops += 1
            if hops > MAX_REDIRECTS:
                raise UpstreamRedirectRefused(self.name, f"a blob was redirected more than {MAX_REDIRECTS} times")
            refusal = await self.egress.redirect_refusal(response.url, target)
            if refusal is not None:
                raise UpstreamRedirectRefused(self.name, f"a blob redirect to {target.host} was refused: {refusal}")
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization", "cookie")}
            if same_origin(target, request.url) and "Authorization" in request.headers:
                headers["Authorization"] = request.headers["Authorization"]
            request = self.client.build_request(request.method, target, headers=headers)
            response = await client.send(request, stream=True)
        return response

    async def _fetch_token(self, request: httpx.Request) -> tuple[int, bytes]:
        """A token request for `RegistryAuth`: no redirect, a bounded body."""
        response = await self.client.send(request, stream=True)
        if response.has_redirect_location:
            await response.aclose()
            raise UpstreamRedirectRefused(
                self.name, f"the token service {request.url.host} answered with a redirect, which only blobs get"
            )
        if response.status_code != 200:
            await response.aclose()
            return response.status_code, b""
        return 200, await self._read(response, Kind.TOKEN, f"the token answer of {request.url.host}")

    async def _read(self, response: httpx.Response, kind: Kind, what: str) -> bytes:
        """The whole body, up to its kind's limit; over it, the connection is dropped and nothing kept."""
        limit = BODY_LIMITS[kind]
        try:
            length = response.headers.get("Content-Length", "")
            declared = units.natural(length)
            if declared is not None and declared > limit:
                raise UpstreamTooLarge(self.name, f"{what} is larger than the {_mib(limit)} limit ({length} bytes)")
            body = bytearray()
            # aiter_bytes, not aiter_raw: it also serves a response whose body was read already
            # (an in-process transport's), and a Content-Encoding is undone within the limit.
            async for chunk in response.aiter_bytes():
                body += chunk
                self.metrics.fetched.inc(len(chunk))
                if len(body) > limit:
                    raise UpstreamTooLarge(self.name, f"{what} is larger than the {_mib(limit)} limit")
            return bytes(body)
        except UpstreamTooLarge as exc:
            log.warning("upstream answer too large", upstream=self.name, what=what, limit=limit, why=str(exc))
            raise
        except httpx.HTTPError as exc:
            self._failed(response.request.method, response.request.url.path, type(exc).__name__)
            raise UpstreamUnavailable(self.name, f"{what} broke off ({type(exc).__name__})") from exc
        finally:
            await response.aclose()  # before the end of the body, this drops the connection

    def _failed(self, method: str, path: str, why: str) -> None:
        """Remember a failure for `/readyz` and the status page, which anyone may read: no
        repository name goes there (the log line has it)."""
        api = path.find("/v2/")  # an upstream's URL may have a path of its own before it
        kind = SEGMENT_OF.get(classify(path[api:] if api >= 0 else path).endpoint, "request")
        self.last_error = (time.time(), f"{method} {kind}: {why}")
        self.metrics.errors.inc()
        log.warning("upstream request failed", upstream=self.name, method=method, path=path, why=why)

    # -- backing off -------------------------------------------------------------------

    @property
    def backoff_until(self) -> float | None:
        """When (wall clock) the upstream is probed next, while it is being backed off from; else None."""
        if self._retry_at is None:
            return None
        return time.time() + max(0.0, self._retry_at - time.monotonic())

    def _refuse_while_backing_off(self) -> None:
        if self._retry_at is None:
            return
        if self._prober is None or self._prober.done():
            self._start_prober()
        wait = max(1, math.ceil(self._retry_at - time.monotonic()))
        raise UpstreamBackingOff(
            self.name,
            f"not contacted for {wait} s more, as it just failed ({self._backoff_why})",
            429 if self._rate_limited else 503,
            str(wait),
        )

    def _back_off(self, why: str, answered: int | None = None, retry_after: str | None = None) -> None:
        """A failure: open a backoff window (or, once the last one ended, a twice longer one)."""
        if answered is not None:
            self._streak += 1
            if self._streak < FAILED_ANSWERS_BEFORE_BACKOFF and self._retry_at is None:
                return
        now = time.monotonic()
        if self._retry_at is not None and now < self._retry_at:
            return  # requests sent before the window opened, failing now: no reason to wait longer
        window = min(BACKOFF_FIRST * 2**self._windows, BACKOFF_MAX)
        seconds = units.natural(retry_after.strip()) if retry_after is not None else None
        if seconds is not None:
            window = max(window, min(float(seconds), BACKOFF_MAX))
        self._windows += 1
        self._retry_at = now + window
        self._backoff_why = why
        self._rate_limited = answered == 429
        log.warning("upstream backed off", upstream=self.name, seconds=window, why=why)
        if self._prober is None or self._prober.done():
            self._start_prober()

    def _answered(self) -> None:
        """The upstream answered (anything but 5xx/429): it is not failing."""
        self._streak = 0
        if self._retry_at is not None:
            log.info("upstream answers again", upstream=self.name)
        self._retry_at = None
        self._windows = 0

    def _start_prober(self) -> None:
        self._prober = asyncio.get_running_loop().create_task(self._probe_until_answered())

    async def _probe_until_answered(self) -> None:
        """At the end of each window, one `GET /v2/` (any answer but 5xx/429 will do), until one succeeds."""
        while self._retry_at is not None:
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            if self._retry_at is None:
                return
            why, status, retry_after = await self._probe()
            if why is None:
                # Requests go through again, but `/v2/` answering says little about the rest:
                # one more failure opens the next (longer) window, a real answer ends all this.
                self.last_ok = time.time()
                self._retry_at = None
                self._streak = max(self._streak, FAILED_ANSWERS_BEFORE_BACKOFF - 1)
                log.info("upstream answers its probe", upstream=self.name)
                return
            self._failed("GET", "/v2/", why)
            self._back_off(why, answered=status, retry_after=retry_after)

    async def _probe(self) -> tuple[str | None, int | None, str | None]:
        """(why it failed or None, the status if it answered, its Retry-After)."""
        request = self.client.build_request("GET", "/v2/", timeout=httpx.Timeout(self.config.connect_timeout))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return type(exc).__name__, None, None
        await response.aclose()
        status = response.status_code
        if status == 429 or status >= 500:
            return str(status), status, response.headers.get("Retry-After")
        return None, status, None

    # -- requests ----------------------------------------------------------------------

    async def head_manifest(self, repo: str, reference: str) -> str | None:
        """The digest a tag points at now, without a GET (Docker Hub does not rate-limit HEAD)."""
        path = f"/v2/{repo}/manifests/{reference}"
        response = await self._send("HEAD", path, Kind.MANIFEST, headers={"Accept": UPSTREAM_ACCEPT})
        await response.aclose()
        digest: str | None = response.headers.get("Docker-Content-Digest")
        return digest

    async def get_manifest(self, repo: str, reference: str) -> FetchedManifest:
        path = f"/v2/{repo}/manifests/{reference}"
        response = await self._send("GET", path, Kind.MANIFEST, headers={"Accept": UPSTREAM_ACCEPT})
        body = await self._read(response, Kind.MANIFEST, f"manifest {repo}:{reference}")
        headers = response.headers
        return FetchedManifest(body, headers.get("Content-Type"), headers.get("Docker-Content-Digest"))

    async def open_blob(self, repo: str, digest: str) -> Source | BlockingSource:
        """The blob's body, to be read on a thread (`BlockingSource`) when the transport allows."""
        path = f"/v2/{repo}/blobs/{digest}"
        response = await self._send("GET", path, Kind.BLOB, client=self.blob_client)
        length = response.headers.get("Content-Length")
        size = units.natural(length) if length else None
        body = blocking_body(response)
        if body is not None:
            return BlockingSource(size, self._blocking_chunks(body_chunks(response, body, size), path), body.close)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    self.metrics.fetched.inc(len(chunk))
                    yield chunk
            except httpx.HTTPError as exc:
                self._failed("GET", f"/v2/{repo}/blobs/{digest}", type(exc).__name__)
                raise UpstreamUnavailable(self.name, f"blob transfer broke off ({type(exc).__name__})") from exc

        return Source(size=size, chunks=chunks(), close=response.aclose)

    def _blocking_chunks(self, body: Iterator[bytes], path: str) -> Iterator[bytes]:
        """Blocking: the raw body (a short one raises, see `threaded.body_chunks`), failures mapped."""
        try:
            for chunk in body:
                self.metrics.fetched.inc(len(chunk))
                yield chunk
        except httpx.HTTPError as exc:
            self._failed("GET", path, type(exc).__name__)
            raise UpstreamUnavailable(self.name, f"blob transfer broke off ({type(exc).__name__})") from exc

    async def open_blob_range(self, repo: str, digest: str, ranges: str) -> RangeSource | None:
        """One range of a blob (`ranges` as a Range header's value), streamed, never verified (a
        range cannot be); None when the upstream answered with anything but one range and the
        blob's size (a 200 carrying the whole blob, say), closed unread. The caller checks the
        range answered is the one it asked for; at most that range's bytes are taken."""
        path = f"/v2/{repo}/blobs/{digest}"
        response = await self._send("GET", path, Kind.BLOB, headers={"Range": ranges})
        answered = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if response.status_code != 206 or answered is None:
            await response.aclose()
            return None
        start, end, size = (int(answered[i]) for i in (1, 2, 3))
        if not start <= end < size:
            await response.aclose()
            return None
        count = end - start + 1

        async def chunks() -> AsyncIterator[bytes]:
            received = 0
            try:
                async for chunk in response.aiter_raw():
                    self.metrics.fetched.inc(len(chunk))
                    wanted = chunk[: count - received]
                    received += len(chunk)
                    if wanted:
                        yield wanted
                    if received >= count:
                        return
            except httpx.HTTPError as exc:
                self._failed("GET", path, type(exc).__name__)
                raise UpstreamUnavailable(self.name, f"blob range broke off ({type(exc).__name__})") from exc
            raise UpstreamUnavailable(self.name, f"blob range ended after {received} of {count} bytes")

        return RangeSource(start, end, size, chunks(), response.aclose)

    async def head_blob(self, repo: str, digest: str) -> int | None:
        response = await self._send("HEAD", f"/v2/{repo}/blobs/{digest}", Kind.BLOB)
        await response.aclose()
        length = response.headers.get("Content-Length")
        return units.natural(length) if length else None

    async def referrers(self, repo: str, digest: str) -> bytes | None:
        """The OCI 1.1 referrers index, or None when the upstream does not offer the API."""
        path = f"/v2/{repo}/referrers/{digest}"
        try:
            response = await self._send("GET", path, Kind.REFERRERS, headers={"Accept": OCI_INDEX})
        except UpstreamNotFound:
            return None
        if not response.headers.get("Content-Type", "").startswith(OCI_INDEX):
            await response.aclose()
            return None  # something else answered the path, e.g. a login page
        return await self._read(response, Kind.REFERRERS, f"the referrers of {repo}@{digest}")

    async def tags(self, repo: str, n: str | None, last: str | None) -> TagPage:
        params = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
        response = await self._send("GET", f"/v2/{repo}/tags/list", Kind.TAGS, params=params)
        body = await self._read(response, Kind.TAGS, f"the tags/list of {repo}")
        try:
            answer = json.loads(body)
            tags = [str(t) for t in (answer.get("tags") or [])]
        except (ValueError, AttributeError, TypeError) as exc:
            raise UpstreamError(self.name, f"tags/list of {repo} is not valid JSON") from exc
        next_query = None
        link = response.links.get("next")
        if link and link.get("url"):
            query = parse_qs(urlsplit(link["url"]).query)
            next_query = {k: v[0] for k, v in query.items() if k in ("n", "last")}
        return TagPage(str(answer.get("name") or repo), tags, next_query)

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        await self.client.aclose()
        if self.blob_client is not self.client:
            await self.blob_client.aclose()
