"""Start-up housekeeping of the app."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.http.app import _remove_stale_partials


def test_a_hard_link_staged_just_now_survives_start_up_however_old_its_file(tmp_path: Path) -> None:
    # A hosted blob staged for the cache is a hard link: its modification time is the push's.
    hosted = tmp_path / "hosted-blob"
    hosted.write_bytes(b"layer")
    os.utime(hosted, (0, 0))
    partial = tmp_path / "partial"
    partial.mkdir()
    os.link(hosted, partial / "sha256-staged")
    _remove_stale_partials(partial)
    assert (partial / "sha256-staged").exists()
