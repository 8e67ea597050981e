"""`pullproxy gc [--dry-run]`: garbage collection of hosted repositories, beside the server's automatic one.

Safe while the server runs: `HostedRepositories.collect` holds the index's write lock, which
every worker's upload completion and manifest push take too.
"""

from __future__ import annotations

import sys

from proxy.config import Config
from proxy.hosted.repository import HostedRepositories
from proxy.units import format_size


def command(config: Config, dry_run: bool) -> int:
    if config.hosted is None:
        print("pullproxy: there are no hosted repositories ([hosted] is not configured)", file=sys.stderr)
        return 2
    hosted = HostedRepositories(config.hosted, config.cache_dir / "hosted")
    try:
        collected = hosted.collect(dry_run)
    finally:
        hosted.close()
    verb = "would remove" if dry_run else "removed"
    print(
        f"{verb} {collected.blobs} blobs ({format_size(collected.bytes)}),"
        f" {collected.unlinked} links no manifest needs, {collected.uploads} expired uploads"
    )
    return 0
