"""What this machine gives a sendfile server: nginx serving one file, measured like the warm scenario.

`python -m bench.nginx_reference [--blob-size 256MiB] [--clients 16] [--repeats 3] [--workers 1]`

The same clients as `bench.run` (bench/client.py: raw sockets, every body hashed), the same
figures as its warm rows: MB/s for 1 client and for `--clients` at once, and the server's CPU
seconds per GiB served. nginx (`apt-get install -y nginx-light`) runs in the foreground with
`sendfile on`, `--workers` worker processes (1 matches `pullproxy --workers 0`), no access
log, on 127.0.0.1 at a free port, from a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/nginx_reference.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import client as blob_client
from bench.run import median, parse_size, run_clients
from bench.system import tree_cpu_seconds
from tests.support.ports import free_port

CONFIG = """
daemon off;
master_process on;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
    }}
}}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blob-size", default="256MiB")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="nginx worker processes (default 1)")
    a = p.parse_args(argv)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    size = parse_size(a.blob_size)
    root = Path(tempfile.mkdtemp(prefix="pp-nginx-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        root.chmod(0o755)  # nginx's workers run as nobody
        (root / "www").mkdir()
        (root / "tmp").mkdir()
        data = os.urandom(size)
        (root / "www" / "blob").write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        del data
        port = free_port()
        (root / "nginx.conf").write_text(CONFIG.format(root=root, port=port, workers=a.workers))
        process = subprocess.Popen([nginx, "-c", str(root / "nginx.conf"), "-p", str(root)])
        url = f"http://127.0.0.1:{port}"
        spec = blob_client.Spec(url=url, path="/blob", digest=digest, size=size, timeout=120)
        for _ in range(100):
            time.sleep(0.05)
            if run_clients(spec)["clients"][0]["ok"]:  # ready, and the file is in the page cache
                break
        else:
            raise RuntimeError(f"nginx did not serve {url}/blob: {(root / 'error.log').read_text()[-2000:]}")
        single, herd, cpu = [], [], []
        for rep in range(a.repeats):
            one = run_clients(spec)
            before = tree_cpu_seconds(process.pid)
            many = run_clients(blob_client.Spec(**{**spec.__dict__, "clients": a.clients}))
            used = tree_cpu_seconds(process.pid) - before
            ok = sum(c["ok"] for c in one["clients"] + many["clients"])
            single.append(size / one["wall_s"] / 1e6)
            herd.append(size * a.clients / many["wall_s"] / 1e6)
            cpu.append(used / (size * a.clients / (1 << 30)))
            print(
                f"rep {rep + 1}: single {single[-1]:.0f} MB/s, {a.clients} clients {herd[-1]:.0f} MB/s,"
                f" {ok}/{a.clients + 1} ok, nginx CPU {cpu[-1]:.3f} s/GiB",
                file=sys.stderr,
            )
        print(
            f"nginx (sendfile, {a.workers} worker(s)), {size // (1 << 20)} MiB, medians of {a.repeats}:"
            f" 1 client {median(single):.0f} MB/s, {a.clients} clients {median(herd):.0f} MB/s,"
            f" CPU {median(cpu):.3f} s/GiB"
        )
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
