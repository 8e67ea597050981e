"""The Distribution (Docker Registry V2) read API, as HTTP endpoints.

Handlers only translate between HTTP and `Mirror`; they never touch the cache directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cache.mediatypes import OCI_INDEX
from proxy import errors, references
from proxy.access.gate import Gate, token
from proxy.access.policy import full_name
from proxy.http import push
from proxy.http.edge import API_VERSION
from proxy.http.multipart import RangesResponse
from proxy.http.ranges import Refusal, one_range, parse_ranges
from proxy.http.responses import BlobResponse, blob_headers, manifest_response
from proxy.mirror import Mirror, Outcome
from proxy.record import record_of
from proxy.routing import Route as UpstreamRoute
from proxy.routing import Router

MAX_PAGE = 10000  # `n` beyond this is served as this: a registry may answer fewer, with a next link


def _mirror(request: Request) -> Mirror:
    mirror: Mirror = request.app.state.mirror
    return mirror


def _gate(request: Request) -> Gate:
    gate: Gate = request.app.state.gate
    return gate


async def _route(request: Request) -> UpstreamRoute:
    """Where the request goes, once the caller is known to be allowed there."""
    router: Router = request.app.state.router
    route = router.route(request.path_params["name"], request.query_params.get("ns"))
    await _gate(request).authorize(request, route)
    return route


def _outcome(request: Request, outcome: Outcome) -> None:
    record_of(request.scope).outcome = outcome


async def base(request: Request) -> Response:
    await _gate(request).check_base(request)
    return Response(b"{}", headers=API_VERSION, media_type="application/json")


async def manifest(request: Request) -> Response:
    route = await _route(request)
    reference = request.path_params["reference"]
    if ":" not in reference and not references.valid_tag(reference):
        raise errors.manifest_unknown(request.path_params["name"], reference)
    found, outcome = await _mirror(request).manifests.get(route, reference)
    _outcome(request, outcome)
    return manifest_response(found, request.method == "HEAD")


async def blob(request: Request) -> Response:
    route = await _route(request)
    digest = request.path_params["digest"]
    mirror = _mirror(request)
    headers = blob_headers(digest)
    if request.method == "HEAD":
        size, outcome = await mirror.blobs.size(route, digest)
        _outcome(request, outcome)
        response = Response(b"", headers=headers)  # adds Content-Length: 0 for the empty body
        if size is None:  # unknown (the upstream did not say): no Content-Length beats a wrong one
            del response.headers["content-length"]
        else:
            response.headers["Content-Length"] = str(size)
        return response
    location = await mirror.blobs.redirect(route, digest)  # `[storage] redirect`, after the access checks
    if location is not None:
        _outcome(request, Outcome.HIT)
        # Not cacheable, unlike the blob: the URL expires in minutes.
        return Response(b"", 307, {**API_VERSION, "Docker-Content-Digest": digest, "Location": location})
    one = one_range(request.headers.get("range"))
    cold = None if one is None else await mirror.blobs.cold_range(route, digest, *one)
    if cold is not None:  # not cached: the upstream's range now, the full download in the background
        _outcome(request, Outcome.MISS)
        answer = cold
        return RangesResponse(
            [(cold.start, cold.end)], cold.size, lambda start, end: answer.chunks(), headers, cold.close
        )
    found = await mirror.blobs.open(route, digest)  # the access checks of a full GET, for a range too
    _outcome(request, found.outcome)
    spans = parse_ranges(request.headers.get("range"), found.size)
    if spans is Refusal.UNSATISFIABLE:
        found.reader.close()
        raise errors.RangeUnsatisfiable(found.size)
    if spans is None:
        return BlobResponse(found.reader, found.size, headers)
    assert isinstance(spans, list) and found.size is not None  # parse_ranges needs a size to return spans
    if len(spans) == 1 and mirror.blobs.at_hand(found, spans[0][1]):
        return BlobResponse(found.reader, found.size, headers, spans[0])

    def source(start: int, end: int) -> AsyncGenerator[bytes, None]:
        return mirror.blobs.span(route, digest, found, start, end)

    async def close() -> None:
        found.reader.close()

    return RangesResponse(spans, found.size, source, headers, close)


async def referrers(request: Request) -> Response:
    route = await _route(request)
    index, outcome = await _mirror(request).referrers.index(route, request.path_params["digest"])
    _outcome(request, outcome)
    headers = dict(API_VERSION)
    artifact_type = request.query_params.get("artifactType")
    if artifact_type is not None:
        index = _only(index, artifact_type)
        headers["OCI-Filters-Applied"] = "artifactType"
    return Response(index, headers=headers, media_type=OCI_INDEX)


def _only(index: bytes, artifact_type: str) -> bytes:
    """The referrers index with only the entries of `artifact_type`; 502 if it is not an index."""
    try:
        parsed = json.loads(index)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("manifests"), list):
        raise errors.bad_upstream("the upstream's referrers answer is not an image index")
    entries = parsed["manifests"]
    parsed["manifests"] = [m for m in entries if isinstance(m, dict) and m.get("artifactType") == artifact_type]
    return json.dumps(parsed).encode()


def _page_params(request: Request) -> tuple[str | None, str | None]:
    """`n` as ASCII decimal digits, at most `MAX_PAGE` (larger is clamped), and `last`."""
    n = request.query_params.get("n")
    if n is None:
        return None, request.query_params.get("last")
    if not re.fullmatch("[0-9]+", n):  # not str.isdigit: it takes "²", which int() refuses
        raise errors.PaginationInvalid(f"n={n[:40]!r} is not a number")
    digits = n.lstrip("0") or "0"
    count = int(digits) if len(digits) <= len(str(MAX_PAGE)) else MAX_PAGE  # never int() of 5000 digits
    return str(min(count, MAX_PAGE)), request.query_params.get("last")


def _next_link(path: str, query: dict[str, str], ns: str | None) -> str:
    if ns is not None:
        query = {**query, "ns": ns}
    return f'<{path}?{urlencode(query)}>; rel="next"'


async def tags(request: Request) -> Response:
    route = await _route(request)
    n, last = _page_params(request)
    page, outcome = await _mirror(request).tags.page(route, n, last)
    _outcome(request, outcome)
    name = request.path_params["name"]
    headers = dict(API_VERSION)
    if page.next_query:
        headers["Link"] = _next_link(request.url.path, page.next_query, request.query_params.get("ns"))
    body = json.dumps({"name": name, "tags": page.tags}).encode()
    return Response(body, headers=headers, media_type="application/json")


async def catalog(request: Request) -> Response:
    """Repositories in the cache that the caller may pull, as clients of this mirror name them."""
    n, last = _page_params(request)
    router: Router = request.app.state.router
    gate = _gate(request)
    caller = await gate.caller(request)
    address = gate.address(request)
    names = sorted(
        router.client_name(upstream, repo)
        for upstream, repo in await _mirror(request).tags.repositories()
        if gate.policy.allows(full_name(upstream, repo), caller.user, address)
    )
    names = sorted({*names, *await push.catalog_names(request, caller.user, address)})
    if last is not None:
        names = [name for name in names if name > last]
    headers = dict(API_VERSION)
    if n is not None and len(names) > int(n):
        names = names[: int(n)]
        if names:
            headers["Link"] = _next_link(request.url.path, {"n": n, "last": names[-1]}, None)
    body = json.dumps({"repositories": names}).encode()
    return Response(body, headers=headers, media_type="application/json")


async def read_only(request: Request) -> Response:
    raise errors.unsupported(f"pullproxy is a read-only mirror: {request.method} is not supported")


READ = ["GET", "HEAD"]
WRITE = ["POST", "PUT", "PATCH", "DELETE"]

routes = [
    Route("/token", token, methods=["GET"]),
    Route("/v2/", base, methods=READ),
    Route("/v2/_catalog", catalog, methods=READ),
    Route("/v2/{name:path}/blobs/uploads/", push.start_upload, methods=["POST"]),
    Route("/v2/{name:path}/blobs/uploads/{upload}", push.upload, methods=[*READ, "PATCH", "PUT", "DELETE"]),
    Route("/v2/{name:path}/manifests/{reference}", push.hosted_or(manifest, push.manifest), methods=READ),
    Route("/v2/{name:path}/blobs/{digest}", push.hosted_or(blob, push.blob), methods=READ),
    Route("/v2/{name:path}/tags/list", push.hosted_or(tags, push.tags), methods=READ),
    Route("/v2/{name:path}/referrers/{digest}", push.hosted_or(referrers, push.referrers), methods=READ),
    Route("/v2/{name:path}/manifests/{reference}", push.write_manifest, methods=["PUT", "DELETE"]),
    Route("/v2/{name:path}/blobs/{digest}", push.delete_blob, methods=["DELETE"]),
    Route("/v2/{rest:path}", read_only, methods=WRITE),
]
