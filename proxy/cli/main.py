"""`pullproxy` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import structlog
import uvicorn

from cache.storage import MetadataUnavailable, StoreUnavailable
from proxy import config as configuration
from proxy import errors, references, tls
from proxy.cli import cache_tools as cli_cache
from proxy.cli import images as cli_images
from proxy.hosted import gc as hosted_gc
from proxy.http import server
from proxy.http.app import CONFIG_ENV, create_app
from proxy.ops import logs, metrics


def _serve(args: argparse.Namespace, config: configuration.Config) -> int:
    workers = args.workers or config.workers
    options = dict(
        host=config.listen_host,
        port=config.listen_port,
        access_log=False,  # pullproxy logs each request itself, with the cache outcome
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=30,
        log_level="warning",
        **server.serve_options(config, workers),  # bounded headers and connections
    )
    options.update(tls.uvicorn_options(config))  # HTTPS with server.tls_cert and tls_key
    if config.tls_cert is None and config.auth is not None:
        structlog.get_logger("pullproxy").warning(
            "serving plain HTTP: passwords and tokens cross the network in clear (see server.tls_cert)"
        )
    if workers > 1:
        if args.config is not None:
            os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
        with metrics.shared_by_workers():
            uvicorn.run("proxy.http.app:app_from_environment", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(config), **options)
    return 0


def _platforms(args: argparse.Namespace) -> list[str] | None:
    """None: every platform (the default, also for pins without `platforms`)."""
    for platform in args.platform or []:
        if not references.valid_platform(platform):
            raise SystemExit(f"pullproxy: --platform {platform!r} is not 'os/arch' or 'os/arch/variant'")
    return None if args.all_platforms else args.platform


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    default_config = os.environ.get(CONFIG_ENV)
    common.add_argument(
        "--config",
        type=Path,
        default=Path(default_config) if default_config else None,
        help=f"TOML configuration file (default: ${CONFIG_ENV}, else built-in defaults)",
    )
    platform = argparse.ArgumentParser(add_help=False)
    choice = platform.add_mutually_exclusive_group()
    choice.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]", help="only these (repeatable)")
    choice.add_argument("--all-platforms", action="store_true", help="every platform of a multi-arch image (default)")

    parser = argparse.ArgumentParser(prog="pullproxy", description="A pull-through caching registry mirror.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[common], help="run the mirror")
    serve.add_argument("--workers", type=int, default=0, help="worker processes sharing one cache")
    serve.set_defaults(run=_serve)

    prefetch = commands.add_parser(
        "prefetch", parents=[common, platform], help="fetch images into the cache now (none named: the [[pin]]s)"
    )
    prefetch.add_argument("images", nargs="*", metavar="IMAGE", help="e.g. docker.io/library/alpine:3.19")
    prefetch.set_defaults(run=lambda a, c: asyncio.run(cli_images.prefetch(c, a.images, _platforms(a))))

    export = commands.add_parser("export", parents=[common, platform], help="write images to an OCI layout archive")
    export.add_argument("--output", "-o", type=Path, required=True, metavar="FILE.tar")
    export.add_argument("--force", action="store_true", help="replace FILE.tar if it exists")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.set_defaults(
        run=lambda a, c: asyncio.run(cli_images.export(c, a.images, a.output, _platforms(a), force=a.force))
    )

    load = commands.add_parser("import", parents=[common], help="load an OCI layout archive into the cache")
    load.add_argument("archive", type=Path, metavar="FILE.tar")
    load.add_argument("--image", metavar="REF", help="the repository for images the archive names only by tag")
    load.set_defaults(run=lambda a, c: asyncio.run(cli_images.import_archive(c, a.archive, a.image)))

    cache = commands.add_parser("cache", help="look at and repair the cache").add_subparsers(dest="tool", required=True)
    cache.add_parser("ls", parents=[common], help="cached images: tags, sizes, last use").set_defaults(
        run=lambda a, c: cli_cache.ls(c)
    )
    cache.add_parser("du", parents=[common], help="disk usage").set_defaults(run=lambda a, c: cli_cache.du(c))
    remove = cache.add_parser("rm", parents=[common], help="remove an image (content other tags use stays)")
    remove.add_argument("image", metavar="IMAGE")
    remove.set_defaults(run=lambda a, c: cli_cache.rm(c, a.image))
    cache.add_parser(
        "verify",
        parents=[common],
        help="re-hash everything; remove what is corrupt in the cache, report it if hosted (exit 1 if any)",
    ).set_defaults(run=lambda a, c: cli_cache.verify(c))

    gc = commands.add_parser("gc", parents=[common], help="remove hosted blobs no repository references")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.set_defaults(run=lambda a, c: hosted_gc.command(c, a.dry_run))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        config = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"pullproxy: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(config.log_format)
    try:
        sys.exit(args.run(args, config))
    except errors.RegistryError as exc:  # e.g. an image of a registry that is not configured
        sys.exit(f"pullproxy: {exc.message}")
    except (StoreUnavailable, MetadataUnavailable) as exc:  # the fleet's bucket or Redis is down
        sys.exit(f"pullproxy: {exc}")
    except OSError as exc:  # e.g. an archive in a folder that does not exist
        where = f"{exc.filename}: " if exc.filename else ""
        sys.exit(f"pullproxy: {where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        sys.exit(130)
