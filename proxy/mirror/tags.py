"""Tag lists (`tags/list`): the upstream's, else the tags this cache has seen (none while the metadata is away)."""

from __future__ import annotations

import structlog
from anyio import to_thread

from cache.storage import Metadata, MetadataUnavailable
from proxy import errors, units
from proxy.mirror.failures import registry_error
from proxy.mirror.outcome import Outcome
from proxy.routing import Route
from proxy.upstream.client import TagPage, UpstreamError, UpstreamNotFound, UpstreamUnavailable
from proxy.upstream.pool import Upstreams

log = structlog.get_logger("pullproxy")


class Tags:
    def __init__(self, meta: Metadata, upstreams: Upstreams, offline: bool) -> None:
        self.meta = meta
        self.upstreams = upstreams
        self.offline = offline

    async def page(self, route: Route, n: str | None, last: str | None) -> tuple[TagPage, Outcome]:
        try:
            page = await self.upstreams.of(route).tags(route.repo, n, last)
        except UpstreamUnavailable as exc:
            try:
                known = await to_thread.run_sync(self.meta.known_tags, route.upstream.name, route.repo)
            except MetadataUnavailable:
                known = []
            if not known:
                if self.offline:
                    raise errors.offline(f"the tag list of {route.prefix + route.repo}") from None
                raise registry_error(exc, route, "tags") from None
            if not self.offline:
                log.warning("stale tags", upstream=route.upstream.name, repo=route.repo, why=str(exc))
            return paginate(route.repo, known, n, last), Outcome.HIT if self.offline else Outcome.STALE
        except UpstreamNotFound:
            raise errors.name_unknown(route.prefix + route.repo, f"repository {route.repo} not found") from None
        except UpstreamError as exc:
            raise registry_error(exc, route, "tags") from None
        if page.next_query is None and (n is not None or last is not None):
            # Some registries (distribution 2.8 among them) ignore n and last: apply them here.
            page = paginate(page.name, page.tags, n, last)
        return page, Outcome.MISS

    async def repositories(self) -> list[tuple[str, str]]:
        """Every (upstream, repository) with a cached tag, for `_catalog`."""
        try:
            return await to_thread.run_sync(self.meta.repositories)
        except MetadataUnavailable as exc:
            raise errors.unavailable(f"the catalog cannot be listed now: {exc}") from None


def paginate(name: str, tags: list[str], n: str | None, last: str | None) -> TagPage:
    """A `tags/list` page from the locally known tags, with the same n/last rules."""
    ordered = sorted(tags)
    if last is not None:
        ordered = [t for t in ordered if t > last]
    count = units.natural(n) if n is not None else None
    if count is not None:
        if len(ordered) > count:
            page = ordered[:count]
            return TagPage(name, page, {"n": str(count), "last": page[-1]} if page else None)
        ordered = ordered[:count]
    return TagPage(name, ordered, None)
