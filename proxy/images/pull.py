"""Pull a whole image through the `Mirror`, as a client would: its manifests, then its blobs.

`prefetch`, `export` and the pin refresher all go through here, so what they fetch is
verified, stored and shared with the server's own downloads (flock'd partial files)
exactly as a client's pull is. Platforms: `None` means every platform of an index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from anyio import to_thread

from cache.flight import DownloadFailed
from cache.manifests import MAX_LEVELS, Descriptor, refs, select
from cache.readers import READ_SIZE
from cache.storage import Manifest, manifest_key
from proxy import errors
from proxy.cli.progress import Task
from proxy.mirror import Blob, Mirror, Outcome
from proxy.routing import Route
from proxy.units import format_size

BlobSink = Callable[[Descriptor, Blob], Awaitable[None]]


@dataclass
class Plan:
    """An image's manifests (top first) and blobs, and what could not be had."""

    top: Manifest
    manifests: list[Manifest] = field(default_factory=list)
    blobs: list[Descriptor] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(b.size or 0 for b in self.blobs)

    def keys(self) -> set[str]:
        """Store keys of everything this image needs, for pinning."""
        return {manifest_key(m.digest) for m in self.manifests} | {b.digest for b in self.blobs}


async def plan(mirror: Mirror, route: Route, reference: str, platforms: Sequence[str] | None) -> Plan:
    """Fetch (or find) every manifest; raises `errors.RegistryError` if the top one cannot be had.

    Each digest is visited once however often indexes list it, and no deeper than `MAX_LEVELS`.
    """
    top, _ = await mirror.manifests.get(route, reference)
    result = Plan(top)
    blobs: dict[str, Descriptor] = {}
    seen = {top.digest}

    async def walk(manifest: Manifest, level: int) -> None:
        result.manifests.append(manifest)
        found = refs(manifest.body)
        for blob in found.blobs:
            blobs.setdefault(blob.digest, blob)
        for child in select(found.manifests, platforms):
            if child.digest in seen:
                continue
            seen.add(child.digest)
            if level >= MAX_LEVELS:
                result.problems.append(f"manifest {child.digest}: nested more than {MAX_LEVELS} levels deep")
                continue
            try:
                fetched, _ = await mirror.manifests.get(route, child.digest)
            except errors.RegistryError as exc:
                result.problems.append(f"manifest {child.digest}: {exc.message}")
                continue
            await walk(fetched, level + 1)

    await walk(top, 1)
    result.blobs = list(blobs.values())
    return result


async def fetch(mirror: Mirror, route: Route, image: Plan, sink: BlobSink, concurrency: int = 4) -> None:
    """Hand each blob to `sink` (at most `concurrency` at once); failures go to `image.problems`."""
    limit = asyncio.Semaphore(concurrency)

    async def one(descriptor: Descriptor) -> None:
        async with limit:
            try:
                blob = await mirror.blobs.open(route, descriptor.digest)
            except errors.RegistryError as exc:
                image.problems.append(f"blob {descriptor.digest}: {exc.message}")
                return
            try:
                await sink(descriptor, blob)
            except DownloadFailed as exc:
                image.problems.append(f"blob {descriptor.digest}: {exc}")
            finally:
                blob.reader.close()

    await asyncio.gather(*(one(b) for b in image.blobs))


async def store(mirror: Mirror, route: Route, image: Plan, task: Task | None = None, pin: bool = False) -> None:
    """Fetch every blob of `image` into the cache; with `pin`, pin each as soon as it is stored."""

    async def sink(descriptor: Descriptor, blob: Blob) -> None:
        await drain(blob, task.advance if task else lambda _: None)
        if pin:  # now, before later blobs of a large image can evict it
            await to_thread.run_sync(mirror.store.pin, [descriptor.digest])
        if task:
            task.item(
                f"{descriptor.digest} {format_size(blob.size)} {'cached' if blob.outcome is Outcome.HIT else 'fetched'}"
            )

    await fetch(mirror, route, image, sink)


async def drain(blob: Blob, advance: Callable[[int], None]) -> None:
    """Wait for a download to be verified and stored, reporting bytes; a cached blob needs nothing."""
    if blob.outcome is Outcome.HIT:
        advance(blob.size or 0)
        return
    offset = 0
    while chunk := await blob.reader.read(offset, READ_SIZE):
        offset += len(chunk)
        advance(len(chunk))
