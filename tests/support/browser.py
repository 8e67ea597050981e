"""Headless Chromium (Debian's `chromium`), to load a page as a person's browser would."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .clients import run

CHROMIUM = "/usr/bin/chromium"
_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium(url: str, *extra: str, timeout: float) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pp-chromium-") as profile:
        argv = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *extra, url]
        return run(argv, timeout=timeout).stdout


def dump_dom(url: str, timeout: float = 60.0) -> str:
    """The page's DOM after it loaded, serialised as HTML."""
    return _chromium(url, "--dump-dom", timeout=timeout).decode()


def screenshot(url: str, path: Path, size: tuple[int, int] = (1200, 900), timeout: float = 60.0) -> Path:
    _chromium(url, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", timeout=timeout)
    return path
