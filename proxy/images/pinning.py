"""Pinned images (`[[pin]]`): fetched ahead, never evicted, refreshed on a schedule.

A round pulls every pin through the `Mirror` (a tag is revalidated as `tag_ttl` allows,
and its last known digest is used while the upstream is down), pins each piece as soon
as it is stored, and then makes exactly what the pins need now the pinned set: content
of a tag's previous digest returns to ordinary LRU eviction.
"""

from __future__ import annotations

import asyncio
import hashlib

import structlog
from anyio import to_thread

from cache.pins import PinLock
from cache.storage import manifest_key
from proxy import errors, references
from proxy.cli.progress import Progress
from proxy.config import Config, PinConfig
from proxy.images import pull
from proxy.mirror import Mirror
from proxy.routing import Router
from proxy.units import format_size

log = structlog.get_logger("pullproxy")
POLL = 60.0  # how often a server worker looks whether a round is due


def lock(config: Config) -> PinLock:
    fingerprint = hashlib.sha256(repr(config.pins).encode()).hexdigest()[:16]
    return PinLock(config.cache_dir, fingerprint)


async def refresh(config: Config, router: Router, mirror: Mirror, progress: Progress | None = None) -> list[str]:
    """One round over every pin; returns what could not be had (cached content of such a pin stays pinned)."""
    keep: set[str] = set()
    problems: list[str] = []
    for pin in config.pins:
        try:
            image = await _pull(pin, router, mirror, progress)
        except errors.RegistryError as exc:
            problems.append(f"{pin.image}: {exc.message}")
            continue
        keep |= image.keys()
        problems += [f"{pin.image}: {problem}" for problem in image.problems]
    await to_thread.run_sync(mirror.store.keep_pinned, keep)
    return problems


async def _pull(pin: PinConfig, router: Router, mirror: Mirror, progress: Progress | None) -> pull.Plan:
    ref = references.parse(pin.image)
    route = router.resolve(ref)
    image = await pull.plan(mirror, route, ref.reference, pin.platforms)
    await to_thread.run_sync(mirror.store.pin, [manifest_key(m.digest) for m in image.manifests])
    task = progress.task(pin.image, image.size) if progress else None
    await pull.store(mirror, route, image, task, pin=True)
    if task:
        task.finish(f"{pin.image}: pinned, {len(image.blobs)} blobs, {format_size(image.size)}")
    return image


async def keep_refreshed(config: Config, router: Router, mirror: Mirror) -> None:
    """The server's background task: a round when due (at start-up, then every `pin_refresh`)."""
    pin_lock = lock(config)
    while True:
        if await to_thread.run_sync(pin_lock.acquire, config.pin_refresh):
            try:
                problems = await refresh(config, router, mirror)
                log.info("pins refreshed", pins=len(config.pins), problems=problems or None)
            except Exception:
                log.exception("pin refresh failed")
            finally:
                pin_lock.release()
        await asyncio.sleep(min(config.pin_refresh, POLL))
