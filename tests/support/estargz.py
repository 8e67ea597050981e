"""An eStargz layer made in Python, and a replay of the requests stargz-snapshotter's remote reader sends.

The layer follows stargz-snapshotter 0.12's `estargz` package: every file's content in a gzip
member of its own (its tar header in the member before), a TOC (`stargz.index.json`, in a tar,
in its own gzip member) and the 51-byte footer: an empty gzip member, stored uncompressed, whose
extra field `SG` holds `%016x` of the TOC's offset and `STARGZ` (estargz/gzip.go,
`gzipFooterBytes`). Decompressed whole, it is an ordinary tar.

`ctr-remote images convert --estargz` (Debian's stargz-snapshotter) makes real ones; `LazyReader`
reads both. It sends what `fs/remote` sends (resolver.go, blob.go): `GET` with `Range: bytes=0-1`
(the redirect check), `HEAD` (the size), then reads aligned to the 50000-byte chunks of its cache
(`defaultChunkSize`), each read's missing chunks merged into ranges and asked for in one `GET`
(`bytes=a-b,c-d`: multi-range), and it reads the answer as `fetch` does: a 200 whole, a 206 single
part by its Content-Range, a 206 `multipart/byteranges` part by part.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import tarfile
import zlib

import httpx

from tests.support.multipart import parts_of

FOOTER_SIZE = 51  # estargz.FooterSize
CHUNK_SIZE = 50000  # fs/config defaultChunkSize: the reader's fetches are aligned to it
TOC_NAME = "stargz.index.json"


def _gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def footer(toc_offset: int) -> bytes:
    subfield = f"{toc_offset:016x}STARGZ".encode()
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    empty = zlib.compressobj(0, zlib.DEFLATED, -15)
    body = empty.compress(b"") + empty.flush()
    data = header + body + struct.pack("<II", 0, 0)
    assert len(data) == FOOTER_SIZE, len(data)
    return data


def parse_footer(data: bytes) -> int:
    """The TOC's offset, read as `GzipDecompressor.ParseFooter` does."""
    assert len(data) == FOOTER_SIZE and data[:4] == b"\x1f\x8b\x08\x04"
    (xlen,) = struct.unpack("<H", data[10:12])
    extra = data[12 : 12 + xlen]
    assert extra[:2] == b"SG" and extra[-6:] == b"STARGZ"
    assert gzip.decompress(data) == b""
    return int(extra[4:20], 16)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % 512)


def build(files: dict[str, bytes]) -> bytes:
    """The eStargz blob of `files` (names in order)."""
    out = bytearray()
    entries = []
    for name, content in files.items():
        out += _gzip_member(_tar_header(name, len(content)))
        entries.append({"name": name, "type": "reg", "size": len(content), "offset": len(out)})
        out += _gzip_member(content + _padding(len(content)))
    toc_offset = len(out)
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    out += _gzip_member(_tar_header(TOC_NAME, len(toc)) + toc + _padding(len(toc)) + b"\0" * 1024)
    out += footer(toc_offset)
    return bytes(out)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class LazyReader:
    """A blob read the way stargz-snapshotter's remote reader reads it; records every Range it sent."""

    def __init__(self, client: httpx.Client, url: str) -> None:
        self.client = client
        self.url = url
        self.sent: list[str] = []  # the Range headers, in order
        self.received = 0  # body bytes of every answer
        self.statuses: list[int] = []
        self.chunks: dict[int, bytes] = {}  # chunk start -> bytes, the reader's cache
        check = self._get("bytes=0-1")  # resolver.go redirect(): a GET with Range, for the status
        assert check.status_code in (200, 206), check.status_code
        head = client.head(url)
        assert head.status_code == 200
        self.size = int(head.headers["Content-Length"])

    def _get(self, ranges: str) -> httpx.Response:
        self.sent.append(ranges)
        response = self.client.get(self.url, headers={"Range": ranges, "Accept-Encoding": "identity"})
        self.statuses.append(response.status_code)
        self.received += len(response.content)
        return response

    def _fetch(self, regions: list[tuple[int, int]]) -> dict[int, bytes]:
        """One GET for the regions, merged as `regionSet.add` merges them; the answer by region start."""
        merged: list[list[int]] = []
        for start, end in sorted(regions):
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        response = self._get("bytes=" + ",".join(f"{b}-{e}" for b, e in merged))
        if response.status_code == 200:
            return {0: response.content}
        assert response.status_code == 206, response.status_code
        media_type = response.headers["Content-Type"]
        if not media_type.startswith("multipart/"):
            match = _CONTENT_RANGE.fullmatch(response.headers["Content-Range"])
            assert match is not None
            return {int(match[1]): response.content}
        parts: dict[int, bytes] = {}
        for content_range, body in parts_of(response):
            match = _CONTENT_RANGE.fullmatch(content_range)
            assert match is not None, content_range
            assert len(body) == int(match[2]) - int(match[1]) + 1
            parts[int(match[1])] = body
        return parts

    def read_at(self, offset: int, size: int) -> bytes:
        """`blob.ReadAt`: the aligned chunks it lacks, fetched in one request, then the bytes from them."""
        first = offset // CHUNK_SIZE * CHUNK_SIZE
        missing = [
            (start, start + CHUNK_SIZE - 1)  # the last one may end past the blob: the server clamps it
            for start in range(first, min(offset + size, self.size), CHUNK_SIZE)
            if start not in self.chunks
        ]
        if missing:
            for start, data in self._fetch(missing).items():
                for at in range(0, len(data), CHUNK_SIZE):
                    self.chunks[start + at] = data[at : at + CHUNK_SIZE]
        out = bytearray()
        for start in range(first, offset + size, CHUNK_SIZE):
            out += self.chunks[start]
        return bytes(out[offset - first : offset - first + size])

    def read_many(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """Several reads whose missing chunks go out in one request (the prefetch and the
        background fetcher batch them so): a multi-range GET when they are apart."""
        missing = sorted(
            {
                (start, start + CHUNK_SIZE - 1)
                for offset, size in spans
                for start in range(offset // CHUNK_SIZE * CHUNK_SIZE, min(offset + size, self.size), CHUNK_SIZE)
                if start not in self.chunks
            }
        )
        if missing:
            for start, data in self._fetch(missing).items():
                for at in range(0, len(data), CHUNK_SIZE):
                    self.chunks[start + at] = data[at : at + CHUNK_SIZE]
        return [self.read_at(offset, size) for offset, size in spans]

    def toc(self) -> list[dict[str, object]]:
        """Footer, then TOC, as `estargz.Open` reads them."""
        toc_offset = parse_footer(self.read_at(self.size - FOOTER_SIZE, FOOTER_SIZE))
        raw = gzip.decompress(self.read_at(toc_offset, self.size - FOOTER_SIZE - toc_offset))
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = tar.extractfile(TOC_NAME)
            assert member is not None
            entries: list[dict[str, object]] = json.load(member)["entries"]
        # A file's bytes (or a chunk's) run from its offset to the next offset (stargz's own rule).
        located = sorted((e for e in entries if int(str(e.get("offset", 0))) > 0), key=lambda e: int(str(e["offset"])))
        for entry, following in zip(located, [*located[1:], None], strict=True):
            entry["end"] = int(str(following["offset"])) if following is not None else toc_offset
        return entries

    def files(self, entries: list[dict[str, object]], names: list[str]) -> dict[str, bytes]:
        """The named regular files' contents, the chunks of all of them fetched together."""
        chosen = [e for e in entries if e["name"] in names and e["type"] in ("reg", "chunk") and "end" in e]
        spans = [(int(str(e["offset"])), int(str(e["end"])) - int(str(e["offset"]))) for e in chosen]
        out: dict[str, bytes] = {}
        for entry, data in zip(chosen, self.read_many(spans), strict=True):
            chunk = gzip.decompress(data)
            size = int(str(entry.get("chunkSize") or entry.get("size") or 0))
            out[str(entry["name"])] = out.get(str(entry["name"]), b"") + chunk[:size]
        return out
