"""`pullproxy` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from proxy import config as configuration
from proxy import logs, metrics
from proxy.app import CONFIG_ENV, create_app


def _serve(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    workers = args.workers or config.workers
    logs.configure(config.log_format)
    options = dict(
        host=config.listen_host,
        port=config.listen_port,
        access_log=False,  # pullproxy logs each request itself, with the cache outcome
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=30,
        log_level="warning",
    )
    if workers > 1:
        if args.config is not None:
            os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
        with metrics.shared_by_workers():
            uvicorn.run("proxy.app:app_from_environment", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(config), **options)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pullproxy", description="A pull-through caching registry mirror.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", type=Path, help="TOML configuration file (optional)")
    serve.add_argument("--workers", type=int, default=0, help="worker processes sharing one cache")
    serve.set_defaults(run=_serve)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.run(args))
    except configuration.ConfigError as exc:
        print(f"pullproxy: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
