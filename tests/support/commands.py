"""Run `pullproxy <command>` as a subprocess against a mirror's config file, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .proxy import REPO_ROOT, Proxy


def pullproxy(proxy: Proxy, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`pullproxy ARGS --config <the mirror's file>`; the mirror may be running or not."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "proxy", *args, "--config", str(proxy.config_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def blob_file(proxy: Proxy, digest: str) -> Path:
    """Where the mirror keeps a cached blob on disk."""
    from cache.store import DiskContentStore

    store = DiskContentStore(proxy.cache_dir, 1 << 40)
    try:
        found = store.find_blob(digest)
    finally:
        store.close()
    assert found is not None, f"{digest} is not cached"
    return Path(found[0])
