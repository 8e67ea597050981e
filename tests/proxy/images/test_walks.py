"""Whole-image walks through the mirror (prefetch, export, pins) and over the cache (`cache ls`, `rm`).

An index may list the same child many times, and indexes may nest: a walk visits each
digest once, so an image of a few manifests costs a few lookups however it repeats them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from cache import inventory
from cache.manifests import MAX_LEVELS
from cache.storage import Manifest
from cache.store import DiskContentStore
from proxy import config as configuration
from proxy import references
from proxy.images import pull
from proxy.mirror import open_mirror
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import to_toml

REPO = "acme/nested"


@pytest.fixture
def hub() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        yield registry


def nested(hub: FaultyRegistry, tag: str, levels: int, repeats: int) -> list[str]:
    """An image under `levels` indexes, each listing its child `repeats` times; digests from the top down."""
    chain = [hub.add_image(REPO, None)[0]]
    for level in range(levels):
        chain.append(hub.add_index(REPO, tag if level == levels - 1 else None, [chain[-1]] * repeats))
    return chain[::-1]


def walk(
    hub: FaultyRegistry, tmp_path: Path, tag: str, platforms: list[str] | None = None
) -> tuple[pull.Plan, Counter[str]]:
    """`pull.plan` as prefetch, export and pins run it, counting the mirror's manifest look-ups."""
    path = tmp_path / "pullproxy.toml"
    settings: dict[str, Any] = {
        "cache": {"dir": str(tmp_path / "cache")},
        "upstream": [{"name": "docker.io", "url": hub.url, "default": True}],
    }
    path.write_text(to_toml(settings))
    config = configuration.load(path, environ={})
    asked: Counter[str] = Counter()

    async def main() -> pull.Plan:
        async with open_mirror(config) as (router, mirror):
            original = mirror.manifests.get

            async def counting(route: Any, reference: str) -> tuple[Manifest, str]:
                asked[reference] += 1
                return await original(route, reference)

            mirror.manifests.get = counting  # type: ignore[method-assign]
            ref = references.parse(f"{REPO}:{tag}")
            return await pull.plan(mirror, router.resolve(ref), ref.reference, platforms)

    return anyio.run(main), asked


@pytest.mark.parametrize("platforms", [None, ["linux/amd64"]])
def test_the_mirror_walk_asks_for_each_manifest_of_a_repeating_nested_index_once(
    hub: FaultyRegistry, tmp_path: Path, platforms: list[str] | None
) -> None:
    chain = nested(hub, "v1", levels=4, repeats=6)  # 6**4 paths to the image
    image, asked = walk(hub, tmp_path, "v1", platforms)
    assert [m.digest for m in image.manifests] == chain  # top first, each once
    assert asked == Counter({"v1": 1, **dict.fromkeys(chain[1:], 1)})
    assert hub.count("GET", "/manifests/") == len(chain)
    assert len(image.blobs) == 2 and not image.problems


def test_the_mirror_walk_stops_at_the_nesting_limit_with_a_problem(hub: FaultyRegistry, tmp_path: Path) -> None:
    chain = nested(hub, "deep", levels=MAX_LEVELS, repeats=1)  # one index too many above the image
    image, asked = walk(hub, tmp_path, "deep")
    assert [m.digest for m in image.manifests] == chain[:MAX_LEVELS]
    assert image.problems == [f"manifest {chain[-1]}: nested more than {MAX_LEVELS} levels deep"]
    assert chain[-1] not in asked


def test_the_cache_tree_of_a_repeating_nested_index_reads_each_manifest_once(
    hub: FaultyRegistry, tmp_path: Path
) -> None:
    chain = nested(hub, "v1", levels=4, repeats=6)
    walk(hub, tmp_path, "v1")  # now cached
    store = DiskContentStore(tmp_path / "cache", 1 << 30)
    try:
        found: Counter[str] = Counter()
        original = store.find_manifest

        def counting(digest: str) -> Manifest | None:
            found[digest] += 1
            return original(digest)

        store.find_manifest = counting  # type: ignore[method-assign]
        tree = inventory.tree(store, chain[0])
    finally:
        store.close()
    assert found == Counter(dict.fromkeys(chain, 1))
    assert tree.manifests == set(chain) and len(tree.blobs) == 2 and tree.platforms == (6, 6)
