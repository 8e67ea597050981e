"""The `Range` header of a blob GET (RFC 9110 §14): one range or several, resolved against the blob's size.

Choices, each one RFC 9110 allows: a header this server does not read (another unit, junk,
more than MAX_RANGES ranges) is ignored and the whole blob sent with 200; ranges beyond the
end are dropped, and if none is left the answer is 416; overlapping ranges are refused with
416 (§14.2 lets a server reject them), so that a request can never make the mirror send
more bytes than the blob holds, over and over.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable

MAX_RANGES = 64  # ranges in one request; stargz-snapshotter asks for far fewer at a time
_SPEC = re.compile(r"([0-9]*)-([0-9]*)")  # ASCII digits only; always fullmatch
_BEYOND = 1 << 62  # stands for any position past every blob, so no number is parsed beyond 18 digits


class Refusal(enum.Enum):
    UNSATISFIABLE = "unsatisfiable"  # no range overlaps the blob, or ranges overlap each other


Span = tuple[int, int]  # first and last byte, inclusive


def _position(digits: str) -> int:
    """A byte position or count; every longer number is past the end of any blob alike."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _BEYOND


def _resolve(first: str, last: str, size: int) -> Span | None:
    """One range-spec resolved against `size`; None when it is not satisfiable."""
    if not first:  # suffix: the last N bytes
        count = _position(last)
        return None if count == 0 or size == 0 else (max(0, size - count), size - 1)
    start = _position(first)
    end = min(_position(last), size - 1) if last else size - 1
    return None if start >= size or end < start else (start, end)


def parse_ranges(header: str | None, size: int | None) -> list[Span] | Refusal | None:
    """The satisfiable ranges asked for, in the order asked; None to send the whole blob; or a refusal."""
    if header is None or size is None:
        return None
    unit, _, specs = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not specs:
        return None
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        return None
    matches = [_SPEC.fullmatch(part.strip()) for part in parts]
    if any(m is None or m.group(0) == "-" for m in matches):
        return None  # an invalid ranges-specifier is ignored as a whole
    spans = [span for m in matches if m is not None and (span := _resolve(m[1], m[2], size)) is not None]
    if not spans:
        return Refusal.UNSATISFIABLE
    ordered = sorted(spans)
    if any(b[0] <= a[1] for a, b in itertools.pairwise(ordered)):
        return Refusal.UNSATISFIABLE
    return spans


def one_range(header: str | None) -> tuple[str, Callable[[int], Span | None]] | None:
    """For a header of exactly one range: the Range to ask an upstream for (the same, in
    plain digits) and what it means for a blob of a given size; None for any other header."""
    if header is None:
        return None
    unit, _, specs = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in specs:
        return None
    match = _SPEC.fullmatch(specs.strip())
    if match is None or match[0] == "-":
        return None
    first, last = match[1], match[2]
    if _position(first) >= _BEYOND or _position(last) >= _BEYOND or (not first and _position(last) == 0):
        return None  # no upstream needs to be asked what this means
    asked = f"bytes={_position(first) if first else ''}-{_position(last) if last else ''}"
    return asked, lambda size: _resolve(first, last, size)
