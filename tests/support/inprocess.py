"""The mirror as an in-process ASGI app over an in-memory fake upstream: no socket is opened.

For tests that throw many requests at the handlers (property tests) or need an upstream
answer no real registry gives (a referrers API listing anything). `MemoryRegistry` is an
httpx transport, so the mirror's real `Upstream` client talks to it; blobs belong to the
repositories they were added to, as in distribution.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from starlette.types import ASGIApp

from proxy.config import Config, UpstreamConfig
from proxy.http.app import create_app

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
UPSTREAM_URL = "http://upstream.invalid"  # never resolved: the transport answers
_PATH = re.compile(r"/v2/(?P<repo>.+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)")
_TAGS = re.compile(r"/v2/(?P<repo>.+)/tags/list")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": code.lower(), "detail": None}]})


@dataclass
class MemoryRegistry(httpx.AsyncBaseTransport):
    """A registry in a few dicts; `requests` logs everything asked."""

    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    referrers: dict[tuple[str, str], bytes] = field(default_factory=dict)  # empty: no referrers API
    head_blob_length: bool = True  # False: HEAD on a blob answers without Content-Length
    requests: list[httpx.Request] = field(default_factory=list)

    def asked(self) -> list[tuple[str, str]]:
        """(method, path) of each request so far."""
        return [(r.method, r.url.path) for r in self.requests]

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[(repo, digest)] = data
        return digest

    def add_manifest(self, repo: str, tag: str | None, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        digest = digest_of(body)
        self.manifests[(repo, digest)] = (body, media_type)
        if tag is not None:
            self.manifests[(repo, tag)] = (body, media_type)
        return digest

    def add_image(self, repo: str, tag: str | None, layer: bytes, **extra: Any) -> tuple[str, str, str]:
        """(manifest, config, layer) digests of a one-layer image; `extra` goes into the manifest."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "repo": repo}).encode()
        config_digest, layer_digest = self.add_blob(repo, config), self.add_blob(repo, layer)
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}
            ],
        }
        manifest = self.add_manifest(repo, tag, json.dumps({**body, **extra}).encode())
        return manifest, config_digest, layer_digest

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(request)
        head = request.method == "HEAD"
        if path == "/v2/":
            return httpx.Response(200, json={})
        if tags := _TAGS.fullmatch(path):
            found = sorted({ref for repo, ref in self.manifests if repo == tags["repo"] and ":" not in ref})
            if not found:
                return _error(404, "NAME_UNKNOWN")
            return httpx.Response(200, json={"name": tags["repo"], "tags": found})
        match = _PATH.fullmatch(path)
        if match is None:
            return _error(404, "NOT_FOUND")
        key = (match["repo"], match["ref"])
        if match["kind"] == "referrers":
            if key in self.referrers:
                return httpx.Response(200, headers={"Content-Type": OCI_INDEX}, content=self.referrers[key])
            return _error(404, "NOT_FOUND")
        if match["kind"] == "manifests":
            if key not in self.manifests:
                return _error(404, "MANIFEST_UNKNOWN")
            body, media_type = self.manifests[key]
            headers = {
                "Content-Type": media_type,
                "Docker-Content-Digest": digest_of(body),
                "Content-Length": str(len(body)),
            }
            return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"" if head else body))
        if key not in self.blobs:
            return _error(404, "BLOB_UNKNOWN")
        data = self.blobs[key]
        if head:
            return httpx.Response(200, headers={"Content-Length": str(len(data))} if self.head_blob_length else {})
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=httpx.ByteStream(data))


class _PortalTransport(httpx.BaseTransport):
    """A synchronous client's requests, sent to the ASGI app on the portal's event loop.

    The body is passed on as a stream, so httpx adds no Content-Length the app did not send.
    """

    def __init__(self, portal: BlockingPortal, app: ASGIApp) -> None:
        self.portal = portal
        self.asgi = httpx.ASGITransport(app, raise_app_exceptions=False, client=("127.0.0.1", 50000))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self.asgi.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(body))

        return self.portal.call(send)


@contextmanager
def mirror_client(directory: Path, upstream: MemoryRegistry, **config: Any) -> Iterator[httpx.Client]:
    """A client of the whole app (its lifespan run) with `upstream` as the default upstream, registry.test."""
    settings = Config(
        cache_dir=directory,
        max_size=64 << 20,
        upstreams=(UpstreamConfig(name="registry.test", url=UPSTREAM_URL, default=True),),
        **config,
    )
    app = create_app(settings, {"registry.test": upstream})
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        httpx.Client(transport=_PortalTransport(portal, app), base_url="http://mirror.test") as client,
    ):
        yield client
