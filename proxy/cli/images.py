"""`pullproxy prefetch`, `export` and `import`: moving images into, out of and between caches.

They run in this process on the cache directory a server may be using at the same time
(diskcache is multi-process safe; downloads share the server's flock'd partial files),
and fetch through the same `Mirror` and upstream clients the server uses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from anyio import from_thread, to_thread

from cache.archive import REF_NAME, ArchiveError, ArchiveReader, ArchiveWriter, OutputExists
from cache.manifests import Descriptor
from cache.readers import READ_SIZE, BlobReader
from proxy import errors, references
from proxy.cli.progress import Progress
from proxy.config import Config
from proxy.hosted import transfer
from proxy.hosted.names import HostedNames
from proxy.hosted.opening import open_hosted
from proxy.hosted.repository import HostedRepositories
from proxy.images import pinning, pull
from proxy.mirror import Blob, Mirror, open_mirror
from proxy.routing import Router, canonical
from proxy.units import format_size


def _report(problems: list[str]) -> int:
    for problem in problems:
        print(f"pullproxy: {problem}", file=sys.stderr)
    return 1 if problems else 0


# -- prefetch ----------------------------------------------------------------------------


async def prefetch(config: Config, images: Sequence[str], platforms: Sequence[str] | None) -> int:
    """Fetch the named images now, or with none named, every `[[pin]]` (and pin them)."""
    if not images and not config.pins:
        raise SystemExit("pullproxy: nothing to prefetch: name images, or add [[pin]] entries to the config")
    problems: list[str] = []
    async with open_mirror(config) as (router, mirror):
        with Progress() as progress:
            if not images:
                pin_lock = pinning.lock(config)
                await to_thread.run_sync(pin_lock.acquire)  # waits for a round the server may be running
                try:
                    problems = await pinning.refresh(config, router, mirror, progress)
                finally:
                    pin_lock.release()
            for text in images:
                try:
                    problems += await _prefetch(router, mirror, text, platforms, progress)
                except (ValueError, errors.RegistryError) as exc:
                    problems.append(f"{text}: {getattr(exc, 'message', exc)}")
    return _report(problems)


async def _prefetch(
    router: Router, mirror: Mirror, text: str, platforms: Sequence[str] | None, progress: Progress
) -> list[str]:
    ref = references.parse(text)
    route = router.resolve(ref)
    name = canonical(route, ref)
    image = await pull.plan(mirror, route, ref.reference, platforms)
    task = progress.task(name, image.size)
    await pull.store(mirror, route, image, task)
    task.finish(f"{name}: {len(image.manifests)} manifests, {len(image.blobs)} blobs, {format_size(image.size)}")
    return [f"{name}: {problem}" for problem in image.problems]


# -- hosted repositories -----------------------------------------------------------------


class _Hosted:
    """`[hosted]`'s repositories, opened on first use by a command that names one."""

    def __init__(self, config: Config, mirror: Mirror) -> None:
        self._config, self._mirror = config, mirror
        self._names = HostedNames(config.hosted.repositories) if config.hosted else None
        self._opened: HostedRepositories | None = None

    def name(self, ref: references.ImageRef) -> str | None:
        """The hosted repository `ref` names (as pushed, no registry in front), if any."""
        if self._names is None or ref.registry is not None or not self._names.matches(ref.repository):
            return None
        return ref.repository

    async def open(self) -> HostedRepositories:
        if self._opened is None:
            assert self._config.hosted is not None
            opened = await to_thread.run_sync(open_hosted, self._config, self._mirror.store.find_blob)
            assert opened is not None
            self._opened = opened
        return self._opened

    async def close(self) -> None:
        if self._opened is not None:
            await to_thread.run_sync(self._opened.close)


def _hosted_ref(repo: str, ref: references.ImageRef) -> str:
    return f"{repo}@{ref.digest}" if ref.digest else f"{repo}:{ref.reference}"


# -- export ------------------------------------------------------------------------------


async def export(
    config: Config, images: Sequence[str], output: Path, platforms: Sequence[str] | None, force: bool = False
) -> int:
    """Write an OCI layout archive from the cache, fetching what it lacks; an existing `output` only with `force`."""
    try:
        archive = await to_thread.run_sync(ArchiveWriter, output, force)
    except ArchiveError as exc:
        raise SystemExit(_export_error(exc)) from None
    try:
        async with open_mirror(config) as (router, mirror):
            hosted = _Hosted(config, mirror)
            try:
                with Progress() as progress:
                    for text in images:
                        ref = references.parse(text)
                        repo = hosted.name(ref)
                        if repo is not None:
                            await _export_hosted(await hosted.open(), archive, repo, ref, progress)
                        else:
                            await _export(router, mirror, archive, text, platforms, progress)
            finally:
                await hosted.close()
            await to_thread.run_sync(archive.commit)
    except ArchiveError as exc:
        archive.abort()
        raise SystemExit(_export_error(exc)) from None
    except (ValueError, errors.RegistryError) as exc:
        archive.abort()
        raise SystemExit(f"pullproxy: export failed: {getattr(exc, 'message', exc)}") from None
    except BaseException:
        archive.abort()
        raise
    return 0


def _export_error(exc: ArchiveError) -> str:
    return f"pullproxy: {exc}; --force replaces it" if isinstance(exc, OutputExists) else f"pullproxy: {exc}"


async def _export_hosted(
    hosted: HostedRepositories, archive: ArchiveWriter, repo: str, ref: references.ImageRef, progress: Progress
) -> None:
    """A hosted image, every platform of it (hosted content has no upstream to fetch a subset from)."""
    name = _hosted_ref(repo, ref)
    task = progress.task(name, None)
    moved = await to_thread.run_sync(transfer.export_image, hosted, archive, repo, ref.reference, name)
    task.finish(f"{name}: {moved.manifests} manifests, {moved.blobs} blobs, {format_size(moved.size)} (hosted)")


class _BlockingReader:
    """A blob's bytes for `tarfile`, which reads in a worker thread: each read waits on the event loop."""

    def __init__(self, reader: BlobReader, advance: Callable[[int], None]) -> None:
        self._reader, self._advance, self._offset = reader, advance, 0

    def read(self, size: int) -> bytes:
        chunk = from_thread.run(self._reader.read, self._offset, min(size, READ_SIZE))
        self._offset += len(chunk)
        self._advance(len(chunk))
        return chunk


async def _export(
    router: Router,
    mirror: Mirror,
    archive: ArchiveWriter,
    text: str,
    platforms: Sequence[str] | None,
    progress: Progress,
) -> None:
    ref = references.parse(text)
    route = router.resolve(ref)
    name = canonical(route, ref)
    image = await pull.plan(mirror, route, ref.reference, platforms)
    for manifest in image.manifests:
        archive.add_bytes(manifest.digest, manifest.body)
    task = progress.task(name, image.size)

    async def sink(descriptor: Descriptor, blob: Blob) -> None:
        size = descriptor.size if descriptor.size is not None else blob.size
        if size is None:
            image.problems.append(f"blob {descriptor.digest}: size unknown")
            return
        if archive.has(descriptor.digest):  # shared with an image exported before
            task.advance(size)
            return
        source = _BlockingReader(blob.reader, task.advance)  # verified before its last byte
        await to_thread.run_sync(archive.add_blob, descriptor.digest, size, source)
        task.item(f"{descriptor.digest} {format_size(size)}")

    await pull.fetch(mirror, route, image, sink, concurrency=1)  # one tar member at a time
    if image.problems:
        raise SystemExit("pullproxy: export failed:\n  " + "\n  ".join(f"{name}: {p}" for p in image.problems))
    archive.add_image(image.top, name)
    task.finish(f"{name}: {len(image.manifests)} manifests, {len(image.blobs)} blobs, {format_size(image.size)}")


# -- import ------------------------------------------------------------------------------


async def import_archive(config: Config, path: Path, image: str | None) -> int:
    """Load an OCI layout archive into the cache, verified, with its images' tags."""
    async with open_mirror(config) as (router, mirror):
        hosted = _Hosted(config, mirror)
        try:
            reader = await to_thread.run_sync(ArchiveReader, path)
        except ArchiveError as exc:
            raise SystemExit(f"pullproxy: {exc}") from None
        try:
            named = [(entry, _name(router, entry, image, path)) for entry in reader.images()]
            with Progress() as progress:
                for entry, ref in named:
                    repo = hosted.name(ref)
                    if repo is not None:
                        await _import_hosted(reader, await hosted.open(), entry, repo, ref, progress)
                    else:
                        await _import(reader, mirror, router, entry, ref, progress)
        except ArchiveError as exc:
            raise SystemExit(f"pullproxy: {path}: {exc}") from None
        except errors.RegistryError as exc:
            raise SystemExit(f"pullproxy: {path}: {exc.message}") from None
        finally:
            reader.close()
            await hosted.close()
    return 0


def _name(router: Router, entry: Descriptor, image: str | None, path: Path) -> references.ImageRef:
    """An entry's ref name when it is a full reference; else `--image` with the entry's tag."""
    ref_name = entry.annotations.get(REF_NAME)
    if ref_name and any(c in ref_name for c in "/:@"):
        return references.parse(ref_name)
    if image is None:
        raise SystemExit(
            f"pullproxy: {path}: image {entry.digest} is named {ref_name!r}, not a full reference: "
            "say which repository it is with --image, e.g. --image docker.io/library/alpine"
            if ref_name
            else f"pullproxy: {path}: image {entry.digest} has no name: give one with --image REGISTRY/REPO:TAG"
        )
    given = references.parse(image)
    return references.ImageRef(given.registry, given.repository, ref_name or given.tag, None)


async def _import(
    reader: ArchiveReader,
    mirror: Mirror,
    router: Router,
    entry: Descriptor,
    ref: references.ImageRef,
    progress: Progress,
) -> None:
    route = router.resolve(ref)
    name = canonical(route, ref)
    image = await to_thread.run_sync(reader.plan, entry)
    task = progress.task(name, image.size)
    added = 0
    for blob in image.blobs:
        if await to_thread.run_sync(reader.import_blob, mirror.store, blob, task.advance):
            added += 1
            task.item(f"{blob.digest} {format_size(blob.size)}")
    for manifest in image.manifests:  # children first: a manifest is visible only with its content
        await to_thread.run_sync(mirror.store.put_manifest, manifest)
    if ref.tag:
        await to_thread.run_sync(mirror.meta.set_tag, route.upstream.name, route.repo, ref.tag, entry.digest)
    absent = f", {image.absent_children} platforms not in the archive" if image.absent_children else ""
    task.finish(f"{name}: {len(image.blobs)} blobs ({added} new), {format_size(image.size)}{absent}")


async def _import_hosted(
    reader: ArchiveReader,
    hosted: HostedRepositories,
    entry: Descriptor,
    repo: str,
    ref: references.ImageRef,
    progress: Progress,
) -> None:
    """Into a hosted repository, pushed as a client would: verified, within the quotas."""
    name = _hosted_ref(repo, ref)
    task = progress.task(name, None)
    moved = await to_thread.run_sync(transfer.import_image, hosted, reader, entry, repo, ref.tag, task.advance)
    task.finish(f"{name}: {moved.blobs} blobs ({moved.added} new), {format_size(moved.size)} (hosted)")
