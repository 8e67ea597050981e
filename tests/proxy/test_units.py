"""Sizes and durations read from the configuration and shown by the commands and the status page."""

from __future__ import annotations

import pytest

from proxy import units


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("10GiB", 10 << 30),
        ("500 MiB", 500 << 20),
        ("1.5g", 1_500_000_000),
        ("2KB", 2000),
        ("1tib", 1 << 40),
        (" 7 b ", 7),
    ],
)
def test_sizes_parse_in_decimal_and_binary_units(text: object, size: int) -> None:
    assert units.parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "10XB", "0", 0, -1, True, "", "1.5.5G", "-5MiB"])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match=r"is not a size such as '10GiB' or '500MiB'"):
        units.parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30.0), (0, 0.0), (1.5, 1.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0)],
)
def test_durations_parse_with_units(text: object, seconds: float) -> None:
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "60", "1y", -1, True, "5 min"])
def test_bad_durations_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match=r"is not a duration such as '30s', '5m' or '1h'"):
        units.parse_duration(text)


@pytest.mark.parametrize(
    ("size", "shown"),
    [(None, "?"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (10 << 30, "10.0 GiB"),
     (3 << 50, "3072.0 TiB"), (512.4, "512 B")],
)  # fmt: skip
def test_sizes_show_in_binary_units(size: float | None, shown: str) -> None:
    assert units.format_size(size) == shown


@pytest.mark.parametrize(
    ("ago", "shown"),
    [(0, "0 s ago"), (89, "89 s ago"), (90, "1 min ago"), (89 * 60, "89 min ago"), (90 * 60, "1 h ago"),
     (35 * 3600, "35 h ago"), (36 * 3600, "1 d ago"), (-5, "0 s ago")],
)  # fmt: skip
def test_moments_show_as_how_long_ago(ago: float, shown: str) -> None:
    assert units.format_ago(1_000_000.0 - ago, 1_000_000.0) == shown


def test_a_moment_that_never_was_says_so() -> None:
    assert units.format_ago(None, 1.0) == "never"
