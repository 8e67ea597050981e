"""Hosted repositories over HTTP: pushes (uploads, manifests), deletes, and reads served locally.

A name matching `[hosted] repositories` is answered here and never routed to an upstream;
`hosted_or` puts these read handlers in front of the mirror's. Without `[hosted]` every write
is refused as before (405). Handlers translate HTTP to `proxy.hosted` and back; bodies are
streamed to disk chunk by chunk, so memory stays flat however large a layer is.

In a fleet (`[coordination]`) an upload is staged on the replica that took its `POST`; a
later request of it that a load balancer sends to another replica is authorized there and
forwarded (`Forwarder`), streamed both ways, to the replica staging it, with a peer
credential bound to its method and path; that one trusts the credential instead of checking
access again, and refuses a forwarded request whose credential is not valid.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import BinaryIO
from urllib.parse import urlencode

import httpx
import structlog
from anyio import to_thread
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from cache import digests
from cache.mediatypes import OCI_INDEX
from cache.readers import FileReader
from proxy import errors
from proxy.access.gate import Gate
from proxy.access.policy import Action, Address, User
from proxy.config import Coordination
from proxy.fleet import peers
from proxy.hosted.repository import MAX_MANIFEST, HostedRepositories, Quota, quota_exceeded
from proxy.http.edge import API_VERSION
from proxy.http.multipart import file_answer
from proxy.http.responses import blob_headers, manifest_response
from proxy.mirror import Mirror
from proxy.ops import metrics
from proxy.routing import Router, valid_name

log = structlog.get_logger("pullproxy")
Endpoint = Callable[[Request], Awaitable[Response]]
MAX_PAGE = 10000
PEER_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # a PUT's answer waits for the digest check and the store
_FORWARDED = ("content-type", "content-length", "content-range", "range", "user-agent")  # and the credential
_ANSWERED = (
    "content-type",
    "content-length",
    "location",
    "range",
    "docker-upload-uuid",
    "docker-content-digest",
    "docker-distribution-api-version",
)
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]{1,18})-([0-9]{1,18})")  # fullmatch


def _hosted(request: Request) -> HostedRepositories | None:
    hosted: HostedRepositories | None = getattr(request.app.state, "hosted", None)
    return hosted


def _gate(request: Request) -> Gate:
    gate: Gate = request.app.state.gate
    return gate


def is_hosted(request: Request) -> bool:
    hosted = _hosted(request)
    return hosted is not None and hosted.names.matches(request.path_params["name"])


def hosted_or(proxied: Endpoint, hosted: Endpoint) -> Endpoint:
    """`hosted` for names of hosted repositories, else the mirror's `proxied`."""

    async def endpoint(request: Request) -> Response:
        return await (hosted if is_hosted(request) else proxied)(request)

    endpoint.__name__ = proxied.__name__
    endpoint.__doc__ = proxied.__doc__
    return endpoint


async def _allowed(request: Request, action: Action) -> tuple[HostedRepositories, str]:
    """The hosted repositories and the name, once the caller may do `action` on it; 405 if not hosted."""
    hosted = _hosted(request)
    name = request.path_params["name"]
    if hosted is None or not hosted.names.matches(name):
        raise errors.unsupported(f"{name[:255]!r} is not a hosted repository: {request.method} is not supported")
    if not valid_name(name):
        raise errors.name_invalid(name)
    await _gate(request).authorize_hosted(request, name, action)
    return hosted, name


class Forwarder:
    """Sends an upload's requests to the replica staging it, streamed both ways, with a peer credential."""

    def __init__(self, coordination: Coordination, replica: peers.Replica) -> None:
        self.credentials = peers.PeerCredentials(coordination.peer_secret, replica)
        self._client = httpx.AsyncClient(timeout=PEER_TIMEOUT, follow_redirects=False, trust_env=False)
        if not self.credentials.enabled:
            log.warning(
                "no [coordination] peer_secret: a hosted upload's requests that reach another replica"
                " than the one staging it are answered 503"
            )

    def trusts(self, request: Request) -> bool:
        """Whether the request carries a valid peer credential made for its method and path."""
        value = request.headers.get(peers.HEADER)
        return self.credentials.check(value, request.method, _target(request)) is not None

    async def forward(self, request: Request, owner: str) -> Response:
        """The answer of `owner` (the staging replica's URL) to this request, its body streamed back as it comes."""
        if not self.credentials.enabled:
            raise errors.unavailable(
                f"the upload is staged on the replica {owner}, and without [coordination] peer_secret"
                " replicas do not forward requests to each other"
            )
        target = _target(request)
        headers = {name: value for name in _FORWARDED if (value := request.headers.get(name)) is not None}
        headers[peers.HEADER] = self.credentials.issue(request.method, target)
        body = request.stream() if request.method in ("PATCH", "PUT") else None
        outgoing = self._client.build_request(request.method, owner.rstrip("/") + target, headers=headers, content=body)
        try:
            answer = await self._client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            raise errors.unavailable(f"the replica {owner} staging the upload did not answer: {exc}") from None
        kept = {name: value for name in _ANSWERED if (value := answer.headers.get(name)) is not None}
        return StreamingResponse(
            answer.aiter_raw(), answer.status_code, headers=kept, background=BackgroundTask(answer.aclose)
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _target(request: Request) -> str:
    """The path and query a peer credential is bound to, the same on both replicas."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _forwarder(request: Request) -> Forwarder | None:
    forwarder: Forwarder | None = getattr(request.app.state, "forwarder", None)
    return forwarder


def _digest(text: str) -> str:
    try:
        digests.parse(text)
    except digests.InvalidDigest:
        raise errors.digest_invalid(text) from None
    return text


# -- reads -------------------------------------------------------------------------------


async def manifest(request: Request) -> Response:
    hosted, name = await _allowed(request, Action.PULL)
    reference = request.path_params["reference"]
    found = await to_thread.run_sync(hosted.manifest, name, reference)
    if found is None:
        raise errors.manifest_unknown(name, reference)
    return manifest_response(found, request.method == "HEAD")


async def blob(request: Request) -> Response:
    hosted, name = await _allowed(request, Action.PULL)
    digest = _digest(request.path_params["digest"])
    found = await to_thread.run_sync(hosted.blob_file, name, digest)
    if found is None:
        raise errors.blob_unknown(digest)
    headers = blob_headers(digest)
    del headers["Cache-Control"]  # a hosted blob may be deleted
    if request.method == "HEAD":
        response = Response(b"", headers=headers)
        response.headers["Content-Length"] = str(found.size)
        return response
    try:
        fd = await to_thread.run_sync(os.open, found.path, os.O_RDONLY)
    except FileNotFoundError:
        raise errors.blob_unknown(digest) from None
    return file_answer(FileReader(fd, found.size), found.size, headers, request.headers.get("range"))


def _page(request: Request) -> tuple[int | None, str | None]:
    n = request.query_params.get("n")
    last = request.query_params.get("last")
    if n is None:
        return None, last
    if not re.fullmatch("[0-9]{1,18}", n):
        raise errors.PaginationInvalid(f"n={n[:40]!r} is not a number")
    return min(int(n), MAX_PAGE), last


def _paged(names: list[str], request: Request, extra: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    n, last = _page(request)
    if last is not None:
        names = [name for name in names if name > last]
    headers = dict(API_VERSION)
    if n is not None and len(names) > n:
        names = names[:n]
        if names:
            query = urlencode({**extra, "n": str(n), "last": names[-1]})
            headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
    return names, headers


async def tags(request: Request) -> Response:
    hosted, name = await _allowed(request, Action.PULL)
    found = await to_thread.run_sync(hosted.tags, name)
    if found is None:
        raise errors.name_unknown(name, f"repository {name} is not known")
    page, headers = _paged(found, request, {})
    body = json.dumps({"name": name, "tags": page}).encode()
    return Response(body, headers=headers, media_type="application/json")


async def referrers(request: Request) -> Response:
    hosted, name = await _allowed(request, Action.PULL)
    digest = _digest(request.path_params["digest"])
    index = await to_thread.run_sync(hosted.referrers, name, digest)
    headers = dict(API_VERSION)
    artifact_type = request.query_params.get("artifactType")
    if artifact_type is not None:
        parsed = json.loads(index)
        parsed["manifests"] = [m for m in parsed["manifests"] if m.get("artifactType") == artifact_type]
        index = json.dumps(parsed).encode()
        headers["OCI-Filters-Applied"] = "artifactType"
    return Response(index, headers=headers, media_type=OCI_INDEX)


async def catalog_names(request: Request, user: User | None, address: Address | None) -> list[str]:
    """The hosted repositories the caller may pull, for `_catalog`."""
    hosted = _hosted(request)
    if hosted is None:
        return []
    policy = _gate(request).policy
    return [name for name in await to_thread.run_sync(hosted.repositories) if policy.allows(name, user, address)]


# -- uploads -----------------------------------------------------------------------------


def _upload_headers(name: str, upload: str, size: int) -> dict[str, str]:
    return {
        **API_VERSION,
        "Location": f"/v2/{name}/blobs/uploads/{upload}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload,
    }


def _stored(name: str, digest: str) -> Response:
    metrics.pushed(metrics.PushKind.BLOB)
    headers = {**API_VERSION, "Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}
    return Response(b"", 201, headers)


def _truncate(path: str, size: int) -> None:
    os.truncate(path, size)


def _open_append(path: str) -> BinaryIO:
    os.utime(path)  # the upload's last activity, which `upload_ttl` counts from, even for an empty chunk
    out = open(path, "r+b")  # noqa: SIM115 (closed by the caller, off the event loop)
    out.seek(0, os.SEEK_END)
    return out


async def _append(
    hosted: HostedRepositories, path: str, request: Request, start: int | None, upload: str | None = None
) -> int:
    """Stream the request body onto the upload's file; the upload's size after it.

    A chunk that does not start where the upload stands is refused (416); one that would go
    over `[hosted] max_size` or breaks off leaves the upload as it was before it.
    """
    size = (await to_thread.run_sync(os.stat, path)).st_size
    if start is not None and start != size:
        raise errors.UploadOutOfOrder(f"the chunk starts at {start}, the upload stands at {size}", size)
    in_use = await to_thread.run_sync(hosted.in_use)
    limit = hosted.config.max_size
    out = await to_thread.run_sync(_open_append, path)
    written = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            written += len(chunk)
            if in_use + written > limit:
                raise quota_exceeded(Quota.SIZE, limit, in_use)
            await to_thread.run_sync(out.write, chunk)
        await to_thread.run_sync(out.flush)
    except (errors.RegistryError, ClientDisconnect, OSError):
        await to_thread.run_sync(out.close)
        await to_thread.run_sync(_truncate, path, size)
        raise
    await to_thread.run_sync(out.close)
    if upload is not None and written:
        await to_thread.run_sync(hosted.grew, upload, size + written)
    return size + written


async def _may_pull(request: Request, name: str) -> bool:
    try:
        await _gate(request).authorize_hosted(request, name, Action.PULL)
    except (errors.Unauthorized, errors.Denied):
        return False
    return True


async def _cached_in(request: Request, source: str, digest: str) -> bool:
    """Whether the caller may pull the mirrored repository `source` and the cache knows it holds `digest`.

    Asks no upstream: a mount is a shortcut, and without it the client simply uploads.
    """
    router: Router = request.app.state.router
    mirror: Mirror = request.app.state.mirror
    try:
        route = router.route(source, request.query_params.get("ns"))
        await _gate(request).authorize(request, route)
    except errors.RegistryError:
        return False
    return await mirror.links.holds(route, digest)


async def start_upload(request: Request) -> Response:
    """`POST .../blobs/uploads/`: a mount, a monolithic upload (`?digest=`), or a session for PATCH/PUT."""
    hosted, name = await _allowed(request, Action.PUSH)
    query = request.query_params
    mount, source = query.get("mount"), query.get("from")
    if mount is not None and source is not None:
        mount = _digest(mount)
        mounted: int | None = None
        if valid_name(source) and hosted.names.matches(source):
            if await _may_pull(request, source):
                mounted = await to_thread.run_sync(hosted.mount, name, source, mount)
        elif await _cached_in(request, source, mount):
            mounted = await to_thread.run_sync(hosted.adopt, name, mount)
        if mounted is not None:
            return _stored(name, mount)
    digest = query.get("digest")
    if digest is not None:
        _digest(digest)
    upload = await to_thread.run_sync(hosted.start_upload, name)
    if digest is not None:
        path = str(await to_thread.run_sync(hosted.upload_path, name, upload))
        await _append(hosted, path, request, None)
        await to_thread.run_sync(hosted.complete_upload, name, upload, digest)
        return _stored(name, digest)
    return Response(b"", 202, _upload_headers(name, upload, 0))


def _content_range(request: Request) -> int | None:
    header = request.headers.get("content-range")
    if header is None:
        return None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or int(match.group(2)) < int(match.group(1)):
        raise errors.BlobUploadInvalid(f"Content-Range {header[:60]!r} is not <start>-<end>")
    return int(match.group(1))


async def upload(request: Request) -> Response:
    """`/v2/<name>/blobs/uploads/<id>`: GET its status, PATCH a chunk, PUT the last one, DELETE it.

    One another replica stages is forwarded to it once the caller may push here; one a replica
    forwarded here is served on its peer credential.
    """
    forwarder = _forwarder(request)
    if forwarder is not None and request.headers.get(peers.HEADER) is not None:
        if not forwarder.trusts(request):
            raise errors.Denied("the peer credential is not valid for this request")
        hosted = _hosted(request)
        name = request.path_params["name"]
        if hosted is None or not hosted.names.matches(name) or not valid_name(name):
            raise errors.name_invalid(name)
    else:
        hosted, name = await _allowed(request, Action.PUSH)
        owner = await to_thread.run_sync(hosted.upload_owner, request.path_params["upload"])
        if owner is not None and forwarder is not None:
            return await forwarder.forward(request, owner)
    upload = request.path_params["upload"]
    path = str(await to_thread.run_sync(hosted.upload_path, name, upload))
    if request.method in ("GET", "HEAD"):
        size = (await to_thread.run_sync(os.stat, path)).st_size
        return Response(b"", 204, _upload_headers(name, upload, size))
    if request.method == "DELETE":
        await to_thread.run_sync(hosted.cancel_upload, name, upload)
        return Response(b"", 204, dict(API_VERSION))
    if request.method == "PATCH":
        size = await _append(hosted, path, request, _content_range(request), upload)
        return Response(b"", 202, _upload_headers(name, upload, size))
    digest = request.query_params.get("digest")  # PUT
    if digest is None:
        raise errors.DigestInvalid("the upload's digest is missing: PUT ...?digest=<digest>")
    _digest(digest)
    await _append(hosted, path, request, _content_range(request))
    await to_thread.run_sync(hosted.complete_upload, name, upload, digest)
    return _stored(name, digest)


# -- manifests and deletes ---------------------------------------------------------------


async def _body(request: Request, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.TooLarge(f"a manifest may be at most {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def write_manifest(request: Request) -> Response:
    """`PUT` a manifest by tag or digest; `DELETE` one by digest, or a tag."""
    reference = request.path_params["reference"]
    if request.method == "DELETE":
        hosted, name = await _allowed(request, Action.DELETE)
        if not await to_thread.run_sync(hosted.delete_manifest, name, reference):
            raise errors.manifest_unknown(name, reference)
        return Response(b"", 202, dict(API_VERSION))
    hosted, name = await _allowed(request, Action.PUSH)
    body = await _body(request, MAX_MANIFEST)
    pushed = await to_thread.run_sync(hosted.put_manifest, name, reference, request.headers.get("content-type"), body)
    headers = {
        **API_VERSION,
        "Location": f"/v2/{name}/manifests/{pushed.digest}",
        "Docker-Content-Digest": pushed.digest,
    }
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    metrics.pushed(metrics.PushKind.MANIFEST)
    return Response(b"", 201, headers)


async def delete_blob(request: Request) -> Response:
    hosted, name = await _allowed(request, Action.DELETE)
    digest = _digest(request.path_params["digest"])
    if not await to_thread.run_sync(hosted.delete_blob, name, digest):
        raise errors.blob_unknown(digest)
    return Response(b"", 202, dict(API_VERSION))
