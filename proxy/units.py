"""Sizes and durations: read as people write them in the configuration, shown as people read them.

Imports nothing else from `proxy`, so the configuration, the commands and the status page
can all use it.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def natural(text: str) -> int | None:
    """A count or size a peer sent: ASCII digits only (`isdigit` takes "²"), at most 18 of them."""
    return int(text) if re.fullmatch("[0-9]{1,18}", text) else None


def parse_size(value: object) -> int:
    """Bytes from a positive integer or text such as `10GiB`, `500MB`, `1.5g`; raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size such as '10GiB' or '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    """Seconds from a number or text such as `30s`, `5m`, `1h`, `250ms`; raises ValueError."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*", str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a duration such as '30s', '5m' or '1h'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_size(size: float | None) -> str:
    """`512 B`, `1.5 GiB`; `?` for an unknown size."""
    if size is None:
        return "?"
    value, unit = float(size), 0
    while value >= 1024 and unit < len(_BINARY_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.0f} B" if unit == 0 else f"{value:.1f} {_BINARY_UNITS[unit]}"


def format_ago(at: object, now: float) -> str:
    """How long before `now` the moment `at` (seconds since the epoch) was; `never` if it is not a number."""
    if not isinstance(at, int | float):
        return "never"
    seconds = max(0, int(now - at))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"
