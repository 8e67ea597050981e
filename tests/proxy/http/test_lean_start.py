"""What a mirror holds in memory before and while it serves: libraries it has no use for stay unloaded.

cryptography (about 10 MiB resident) is needed only for TLS files, client certificates and
token auth (PyJWT loads it), jinja2 only for the status page, obstore and redis-py (about
9 MiB) only for a fleet: a mirror configured without them never imports them, and the page
still renders once someone asks for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.proxy import REPO_ROOT

_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
from tests.support.inprocess import MemoryRegistry, mirror_client

HEAVY = ("cryptography", "jwt", "jinja2", "obstore", "redis")
upstream = MemoryRegistry()
digest = upstream.add_blob("acme/app", b"x" * 1000)
loaded = {}
with tempfile.TemporaryDirectory() as directory, mirror_client(Path(directory), upstream) as client:
    assert client.get("/v2/").status_code == 200
    assert client.get(f"/v2/acme/app/blobs/{digest}").content == b"x" * 1000
    loaded["serving"] = sorted(name for name in HEAVY if name in sys.modules)
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower(), page.status_code
    loaded["after the status page"] = sorted(name for name in HEAVY if name in sys.modules)
print(json.dumps(loaded))
"""


def test_a_mirror_without_tls_or_tokens_never_loads_cryptography_and_loads_jinja2_for_its_status_page() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120, check=False
    )
    assert child.returncode == 0, child.stderr.decode()[-3000:]
    loaded = json.loads(child.stdout.decode().splitlines()[-1])
    assert loaded == {"serving": [], "after the status page": ["jinja2"]}
