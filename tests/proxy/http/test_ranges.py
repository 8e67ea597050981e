"""Range headers read (RFC 9110 §14), and 206 answers framed: one part as itself, several as
multipart/byteranges, parsed back with Python's `email` package."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.http.multipart import RangesResponse
from proxy.http.ranges import MAX_RANGES, Refusal, one_range, parse_ranges
from tests.support.inprocess import MemoryRegistry, mirror_client
from tests.support.multipart import parts_of


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", [(0, 99)]),
        ("bytes=-400", [(600, 999)]),
        ("bytes=990-", [(990, 999)]),
        ("bytes=900-5000", [(900, 999)]),  # clamped to the end
        ("bytes=0-9, 100-109 ,-5", [(0, 9), (100, 109), (995, 999)]),  # in the order asked
        ("bytes=100-109,0-9", [(100, 109), (0, 9)]),
        ("bytes=0-9,5000-6000", [(0, 9)]),  # the unsatisfiable one is dropped
        ("bytes=5000-6000,7000-", Refusal.UNSATISFIABLE),
        ("bytes=0-99,50-149", Refusal.UNSATISFIABLE),  # overlapping
        ("bytes=-0", Refusal.UNSATISFIABLE),
        ("bytes=0-9,x", None),  # an invalid set is ignored as a whole
        ("bytes=-", None),
        ("items=0-9", None),
        (
            "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES)),
            [(i * 10, i * 10 + 1) for i in range(MAX_RANGES)],
        ),
        ("bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES + 1)), None),  # too many: 200
    ],
)
def test_range_headers_resolve_against_the_size(header: str | None, expected: object) -> None:
    assert parse_ranges(header, 1000) == expected


@pytest.mark.parametrize(
    ("header", "asked", "meaning"),
    [
        ("bytes=-400", "bytes=-400", (600, 999)),
        ("bytes=0010-0019", "bytes=10-19", (10, 19)),
        ("bytes=990-", "bytes=990-", (990, 999)),
        ("bytes=900-5000", "bytes=900-5000", (900, 999)),
        ("bytes=5000-", "bytes=5000-", None),
    ],
)
def test_one_range_is_asked_upstream_as_it_was_asked(header: str, asked: str, meaning: tuple[int, int] | None) -> None:
    found = one_range(header)
    assert found is not None
    assert found[0] == asked
    assert found[1](1000) == meaning


@pytest.mark.parametrize(
    "header", [None, "bytes=0-1,5-6", "bytes=-", "bytes=-0", "items=0-1", "bytes=" + "9" * 30 + "-"]
)
def test_other_range_headers_are_not_asked_upstream_as_one_range(header: str | None) -> None:
    assert one_range(header) is None


def _app(data: bytes, spans: list[tuple[int, int]], closed: list[bool]) -> Starlette:
    async def source(start: int, end: int) -> AsyncGenerator[bytes, None]:
        for at in range(start, end + 1, 7):  # small pieces, as a network delivers them
            yield data[at : min(at + 7, end + 1)]

    async def close() -> None:
        closed.append(True)

    async def endpoint(request: Request) -> Response:
        return RangesResponse(spans, len(data), source, {"Content-Type": "application/octet-stream"}, close)

    return Starlette(routes=[Route("/", endpoint)])


def get(app: Starlette) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.get("/")

    return asyncio.run(run())


def test_several_ranges_are_multipart_byteranges_with_an_exact_length() -> None:
    data = bytes(range(256)) * 8
    spans = [(0, 99), (1000, 1099), (2040, 2047)]
    closed: list[bool] = []
    response = get(_app(data, spans, closed))
    assert response.status_code == 206
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert parts_of(response) == [(f"bytes {s}-{e}/{len(data)}", data[s : e + 1]) for s, e in spans]
    assert closed == [True]


def test_one_range_is_a_plain_206_with_its_content_range() -> None:
    data = bytes(range(256))
    closed: list[bool] = []
    response = get(_app(data, [(200, 255)], closed))
    assert response.status_code == 206
    assert response.headers["Content-Range"] == "bytes 200-255/256"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.content == data[200:]
    assert closed == [True]


def test_a_cold_range_on_an_upstream_that_ignores_range_is_still_only_the_range(tmp_path: Path) -> None:
    """MemoryRegistry answers every blob GET with 200 and the whole blob, Range or not."""
    upstream = MemoryRegistry()
    data = bytes(range(256)) * (64 << 10)  # 16 MiB: the download is far from its end when the range is asked
    digest = upstream.add_blob("team/app", data)
    with mirror_client(tmp_path, upstream) as client:
        tail = client.get(f"/v2/team/app/blobs/{digest}", headers={"Range": "bytes=-400"})
        assert tail.status_code == 206
        assert tail.headers["Content-Range"] == f"bytes {len(data) - 400}-{len(data) - 1}/{len(data)}"
        assert tail.content == data[-400:]
        several = client.get(f"/v2/team/app/blobs/{digest}", headers={"Range": "bytes=0-9,-10"})
        assert several.status_code == 206
        assert parts_of(several) == [
            (f"bytes 0-9/{len(data)}", data[:10]),
            (f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}", data[-10:]),
        ]
    asked = [r.headers.get("range") for r in upstream.requests if r.method == "GET"]
    # The tail as asked, then (answered with 200) the full download and the range once more, as resolved.
    assert asked[:3] == ["bytes=-400", None, f"bytes={len(data) - 400}-{len(data) - 1}"]
