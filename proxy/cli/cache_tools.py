"""`pullproxy cache ls | du | rm IMAGE | verify`: look at and repair the cache, also while a server runs.

Hosted content is looked at, verified and reported, never removed here: what was pushed is
deleted through the registry API and freed by `pullproxy gc`.

A running server keeps small in-memory maps: after `rm`, it may still answer the removed
tag until `tag_ttl` has passed and a removed manifest it holds in memory (immutable and
verified, so never wrong); blobs are always re-opened from disk, and one that is gone is
fetched again from the upstream.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from cache import inventory
from cache.storage import ContentStore, Metadata
from proxy import references
from proxy.cli.progress import Progress
from proxy.config import Config
from proxy.hosted.names import HostedNames
from proxy.hosted.opening import open_hosted
from proxy.hosted.repository import Damaged, HostedRepositories
from proxy.mirror.mirror import open_storage
from proxy.routing import Router, canonical
from proxy.units import format_ago, format_size


@contextlib.contextmanager
def _open(config: Config) -> Iterator[tuple[ContentStore, Metadata]]:
    if not config.cache_dir.is_dir():
        raise SystemExit(f"pullproxy: no cache at {config.cache_dir}")
    store, meta = open_storage(config)
    try:
        yield store, meta
    finally:
        store.close()
        meta.close()


def ls(config: Config) -> int:
    with _open(config) as (store, meta):
        listed = inventory.images(store, meta)
    rows = [("IMAGE", "DIGEST", "SIZE", "LAST USED", "NOTE")]
    for image in sorted(listed, key=lambda i: (i.upstream, i.repo, i.tag)):
        notes = ["pinned"] if image.pinned else []
        if image.platforms:
            notes.append(f"{image.platforms[0]}/{image.platforms[1]} platforms")
        if not image.complete:
            notes.append("incomplete")
        rows.append(
            (
                f"{image.upstream}/{image.repo}:{image.tag}",
                image.digest[:19],
                format_size(image.size),
                "-" if image.last_used is None else format_ago(image.last_used, time.time()),
                ", ".join(notes),
            )
        )
    rows.extend(_hosted_rows(config))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _hosted_rows(config: Config) -> list[tuple[str, str, str, str, str]]:
    """The tags of hosted repositories, named as pushed and marked `hosted`."""
    directory = config.cache_dir / "hosted"
    if config.hosted is None or (config.coordination is None and not directory.is_dir()):
        return []
    hosted = open_hosted(config)
    assert hosted is not None
    try:
        images = hosted.images()
    finally:
        hosted.close()
    rows = []
    for image in images:
        notes = ["hosted"] + ([f"{image.platforms} platforms"] if image.platforms else [])
        rows.append((f"{image.repo}:{image.tag}", image.digest[:19], format_size(image.size), "-", ", ".join(notes)))
    return rows


def du(config: Config) -> int:
    with _open(config) as (store, _):
        entries = store.entries()
        volume = store.volume()
    blobs = [e for e in entries if not e.is_manifest]
    manifests = [e for e in entries if e.is_manifest]
    pinned = [e for e in entries if e.pinned]
    print(f"cache       {format_size(volume)} of {format_size(config.max_size)} ({volume / config.max_size:.0%})")
    print(f"blobs       {format_size(sum(e.size for e in blobs))} in {len(blobs)}")
    print(f"manifests   {format_size(sum(e.size for e in manifests))} in {len(manifests)}")
    print(f"pinned      {format_size(sum(e.size for e in pinned))} in {len(pinned)}")
    print(f"downloads   {format_size(inventory.directory_size(config.cache_dir / 'partial'))} in progress")
    print(f"metadata    {format_size(inventory.directory_size(config.cache_dir / 'meta'))} (tags)")
    if config.hosted is not None:
        hosted = config.cache_dir / "hosted"
        used = inventory.directory_size(hosted) if hosted.exists() else 0
        if config.coordination is not None:  # the fleet's, as [hosted] max_size counts it
            repositories = open_hosted(config)
            assert repositories is not None
            try:
                used = repositories.in_use()
            finally:
                repositories.close()
        print(f"hosted      {format_size(used)} of {format_size(config.hosted.max_size)} (pushed, never evicted)")
    return 0


def rm(config: Config, image: str) -> int:
    try:
        ref = references.parse(image)
    except ValueError as exc:
        raise SystemExit(f"pullproxy: {exc}") from None
    if (
        config.hosted is not None
        and ref.registry is None
        and HostedNames(config.hosted.repositories).matches(ref.repository)
    ):
        raise SystemExit(
            f"pullproxy: {ref.repository} is a hosted repository: `cache rm` removes only cached content."
            f" Delete what was pushed with the registry API (DELETE /v2/{ref.repository}/manifests/<tag or digest>)"
            " and `pullproxy gc` frees the blobs no manifest needs"
        )
    route = Router(config.upstreams).resolve(ref)
    with _open(config) as (store, meta):
        tags, freed = inventory.remove(store, meta, route.upstream.name, route.repo, ref.reference)
    name = f"{route.upstream.name}/{route.repo}"
    if not tags and not freed:
        raise SystemExit(f"pullproxy: {canonical(route, ref)} is not in the cache")
    print(f"removed {', '.join(f'{name}:{t}' for t in tags) or ref.reference}, freed {format_size(freed)}")
    if any(references.parse(pin.image) == ref for pin in config.pins):
        print("note: it is a [[pin]]: the next pin refresh fetches it again")
    return 0


def verify(config: Config) -> int:
    """Cached content that is corrupt is removed (the mirror fetches it again); hosted content only reported."""
    with _open(config) as (store, _), Progress() as progress:
        total = sum(e.size for e in store.entries() if not e.is_manifest)
        task = progress.task("verifying", total)
        bad = inventory.verify(store, task.advance)
        task.finish(f"verified {format_size(total)}: {len(bad)} corrupt or missing")
        damaged = _verify_hosted(config, progress)
    for digest in bad:
        print(f"removed corrupt {digest}")
    for found in damaged:
        print(_damage_note(found))
    return 1 if bad or damaged else 0


def _verify_hosted(config: Config, progress: Progress) -> list[Damaged]:
    directory = config.cache_dir / "hosted"
    if config.hosted is None or not directory.is_dir():
        return []
    hosted = HostedRepositories(config.hosted, directory)
    try:
        total = sum(e.size for e in hosted.content.entries() if not e.is_manifest)
        task = progress.task("verifying hosted", total)
        damaged = hosted.verify(task.advance)
        task.finish(f"verified {format_size(total)} hosted: {len(damaged)} corrupt or missing")
    finally:
        hosted.close()
    return damaged


def _damage_note(found: Damaged) -> str:
    """What is wrong with a hosted blob or manifest and how to repair it: it is kept, pushes are acknowledged."""
    kind = "manifest" if found.manifest else "blob"
    if not found.repositories:
        return f"corrupt hosted {kind} {found.digest}: no repository links it; `pullproxy gc` removes it"
    where = ", ".join(found.repositories)
    path = "manifests" if found.manifest else "blobs"
    return (
        f"corrupt hosted {kind} {found.digest} in {where}: kept, not removed (an acknowledged push);"
        f" delete it (DELETE /v2/<repository>/{path}/{found.digest} in each), run `pullproxy gc`, then push it again"
    )
