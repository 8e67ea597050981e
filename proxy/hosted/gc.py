"""`pullproxy gc [--dry-run]`: garbage collection of hosted repositories, beside the server's automatic one.

Safe while the server runs: `HostedRepositories.collect` holds the index's write lock, which
every worker's upload completion and manifest push take too (with `[coordination]`, every
replica's: the lock is in Redis).
"""

from __future__ import annotations

import sys

from proxy.config import Config
from proxy.hosted.opening import open_hosted
from proxy.units import format_size


def command(config: Config, dry_run: bool) -> int:
    if config.hosted is None:
        print("pullproxy: there are no hosted repositories ([hosted] is not configured)", file=sys.stderr)
        return 2
    hosted = open_hosted(config)
    assert hosted is not None
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
