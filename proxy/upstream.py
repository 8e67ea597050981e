"""One upstream registry: its HTTP client, credentials, and the few requests a mirror makes.

Each upstream has its own connection pool and timeouts, so one that is down or slow
never holds up requests for the others. Failures are sorted into what the mirror acts
on: not found, refused, or unavailable (unreachable, timed out, 5xx, 429) — the last
being when a cached answer may be served stale.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpcore
import httpx
import structlog

from cache.flight import Source
from proxy import metrics, tls
from proxy.config import UpstreamConfig
from proxy.mediatypes import OCI_INDEX, UPSTREAM_ACCEPT
from proxy.upstream_auth import RegistryAuth

log = structlog.get_logger("pullproxy")
MAX_MANIFEST_SIZE = 4 << 20

# httpcore reads a response body 64 KiB per call, each call paying for a timeout scope;
# blobs are large, so let one call take what one transport read delivers (up to 256 KiB).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 256 << 10


class UpstreamError(Exception):
    def __init__(self, upstream: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{upstream}: {message}")
        self.status = status


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamDenied(UpstreamError):
    pass


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, 5xx or 429: the cases where a stale answer beats none."""

    def __init__(self, upstream: str, message: str, status: int | None = None, retry_after: str | None = None):
        super().__init__(upstream, message, status)
        self.retry_after = retry_after


class UpstreamOffline(UpstreamUnavailable):
    """`[cache] offline = true`: nothing is sent, so an air-gapped mirror makes no connection attempts."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "not contacted in offline mode", 503)


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


class Upstream:
    def __init__(
        self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None, offline: bool = False
    ) -> None:
        self.config = config
        self.name = config.name
        self.offline = offline
        self.auth = RegistryAuth(config.username, config.password)
        self.client = httpx.AsyncClient(
            base_url=config.url,
            auth=self.auth,
            follow_redirects=True,  # httpx drops Authorization when a redirect leaves the origin
            timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=32),
            headers={"User-Agent": "pullproxy/0.1", "Accept-Encoding": "identity"},
            transport=transport,
            verify=tls.upstream_context(config),  # the system's trust store, ca_file, client_cert
        )
        self.last_ok: float | None = None
        self.last_error: tuple[float, str] | None = None
        self.metrics = metrics.for_upstream(config.name)

    async def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: object) -> httpx.Response:
        """Send, mapping every failure to an `UpstreamError`; a streamed body is left open."""
        if self.offline:
            raise UpstreamOffline(self.name)
        request = self.client.build_request(method, path, **kwargs)  # type: ignore[arg-type]
        started = time.perf_counter()
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.HTTPError, ssl.SSLError) as exc:  # a TLS alert after the handshake comes as SSLError
            why = tls.explain_failure(exc, self.config)
            self._failed(method, path, why or type(exc).__name__)
            raise UpstreamUnavailable(self.name, why or f"unreachable ({type(exc).__name__})") from exc
        finally:
            self.metrics.seconds.observe(time.perf_counter() - started)
        if response.status_code < 400:
            self.last_ok = time.time()
            if not stream:
                try:
                    await response.aread()
                except httpx.HTTPError as exc:
                    self._failed(method, path, type(exc).__name__)
                    raise UpstreamUnavailable(self.name, f"broken response ({type(exc).__name__})") from exc
                self.metrics.fetched.inc(len(response.content))
            return response
        await response.aclose()
        status = response.status_code
        if status == 404:
            raise UpstreamNotFound(self.name, f"{path} not found", status)
        if status in (401, 403):
            raise UpstreamDenied(self.name, f"{method} {path} refused with {status}", status)
        if status == 429 or status >= 500:
            self._failed(method, path, str(status))
            raise UpstreamUnavailable(self.name, f"answered {status}", status, response.headers.get("Retry-After"))
        raise UpstreamError(self.name, f"{method} {path} answered {status}", status)

    def _failed(self, method: str, path: str, why: str) -> None:
        """Remember a failure for `/readyz` and the status page, which anyone may read: no
        repository name goes there (the log line has it)."""
        kind = next((k for k in ("manifests", "blobs", "tags", "referrers") if f"/{k}/" in path), "request")
        self.last_error = (time.time(), f"{method} {kind}: {why}")
        self.metrics.errors.inc()
        log.warning("upstream request failed", upstream=self.name, method=method, path=path, why=why)

    async def head_manifest(self, repo: str, reference: str) -> str | None:
        """The digest a tag points at now, without a GET (Docker Hub does not rate-limit HEAD)."""
        response = await self._send("HEAD", f"/v2/{repo}/manifests/{reference}", headers={"Accept": UPSTREAM_ACCEPT})
        return response.headers.get("Docker-Content-Digest")

    async def get_manifest(self, repo: str, reference: str) -> FetchedManifest:
        response = await self._send(
            "GET", f"/v2/{repo}/manifests/{reference}", stream=True, headers={"Accept": UPSTREAM_ACCEPT}
        )
        try:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                self.metrics.fetched.inc(len(chunk))
                if len(body) > MAX_MANIFEST_SIZE:
                    raise UpstreamError(self.name, f"manifest {repo}:{reference} is larger than 4 MiB")
        except httpx.HTTPError as exc:
            self._failed("GET", f"/v2/{repo}/manifests/{reference}", type(exc).__name__)
            raise UpstreamUnavailable(self.name, f"manifest transfer broke off ({type(exc).__name__})") from exc
        finally:
            await response.aclose()
        return FetchedManifest(
            bytes(body), response.headers.get("Content-Type"), response.headers.get("Docker-Content-Digest")
        )

    async def open_blob(self, repo: str, digest: str) -> Source:
        response = await self._send("GET", f"/v2/{repo}/blobs/{digest}", stream=True)
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None

        async def chunks():  # type: ignore[no-untyped-def]
            try:
                async for chunk in response.aiter_raw():
                    self.metrics.fetched.inc(len(chunk))
                    yield chunk
            except httpx.HTTPError as exc:
                self._failed("GET", f"/v2/{repo}/blobs/{digest}", type(exc).__name__)
                raise UpstreamUnavailable(self.name, f"blob transfer broke off ({type(exc).__name__})") from exc

        return Source(size=size, chunks=chunks(), close=response.aclose)

    async def head_blob(self, repo: str, digest: str) -> int | None:
        response = await self._send("HEAD", f"/v2/{repo}/blobs/{digest}")
        length = response.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    async def referrers(self, repo: str, digest: str) -> bytes | None:
        """The OCI 1.1 referrers index, or None when the upstream does not offer the API."""
        try:
            response = await self._send("GET", f"/v2/{repo}/referrers/{digest}", headers={"Accept": OCI_INDEX})
        except UpstreamNotFound:
            return None
        if not response.headers.get("Content-Type", "").startswith(OCI_INDEX):
            return None  # something else answered the path, e.g. a login page
        return response.content

    async def tags(self, repo: str, n: str | None, last: str | None) -> TagPage:
        params = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
        response = await self._send("GET", f"/v2/{repo}/tags/list", params=params)
        try:
            answer = response.json()
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
        await self.client.aclose()
