"""Hosted content in `/metrics` and on the status page."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.hosted.repository import Quota, RepositoryUse, Usage
from proxy.ops import status
from tests.proxy.hosted.test_push_api import hosted_client, push_blob, push_image
from tests.support.inprocess import MemoryRegistry


def samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_cover_hosted_bytes_repositories_manifests_pushes_and_quotas(tmp_path: Path) -> None:
    for client in hosted_client(tmp_path, MemoryRegistry(), max_size="1MiB", max_repositories=7):
        before = samples(client)
        pushes = before.get(("pullproxy_hosted_pushes_total", (("kind", "blob"),)), 0.0)
        manifests = before.get(("pullproxy_hosted_pushes_total", (("kind", "manifest"),)), 0.0)
        push_image(client, "acme/app", "v1", b"x" * 1000)
        push_image(client, "acme/app", "v2", b"y" * 2000)
        assert push_blob(client, "acme/other", b"z" * 500).status_code == 201
        got = samples(client)
        assert got[("pullproxy_hosted_repositories", ())] == 2
        assert got[("pullproxy_hosted_manifests", ())] == 2
        assert got[("pullproxy_hosted_bytes", ())] >= 3502  # the blobs once each ({} twice) and the manifests
        assert got[("pullproxy_hosted_pushes_total", (("kind", "blob"),))] - pushes == 5
        assert got[("pullproxy_hosted_pushes_total", (("kind", "manifest"),))] - manifests == 2
        assert got[("pullproxy_hosted_quota_limit", (("quota", "max_size"),))] == 1 << 20
        assert got[("pullproxy_hosted_quota_use", (("quota", "max_size"),))] == got[("pullproxy_hosted_bytes", ())]
        assert got[("pullproxy_hosted_quota_limit", (("quota", "max_repositories"),))] == 7
        assert got[("pullproxy_hosted_quota_use", (("quota", "max_repositories"),))] == 2
        assert got[("pullproxy_hosted_quota_use", (("quota", "max_manifests_per_repository"),))] == 2


def test_status_page_shows_hosted_repositories_and_quota_bars(tmp_path: Path) -> None:
    for client in hosted_client(tmp_path, MemoryRegistry(), max_repositories=4):
        push_image(client, "acme/app", "v1", b"x" * 1000)
        push_image(client, "acme/app", "v2", b"y" * 1000)
        page = client.get("/").text
        assert 'id="hosted"' in page
        assert "<code>acme/app</code>" in page
        assert "max_repositories</b>: 1 of 4" in page
        assert 'aria-label="25% used"><div style="width:25.0%">' in page


def test_status_page_without_hosted_has_no_hosted_section(tmp_path: Path) -> None:
    from tests.support.inprocess import mirror_client

    with mirror_client(tmp_path, MemoryRegistry()) as client:
        assert 'id="hosted"' not in client.get("/").text


def test_hosted_view_lists_only_what_the_caller_may_pull_and_bounds_the_list() -> None:
    repos = tuple(RepositoryUse(f"acme/r{i:03}", 1000 * i, i, i) for i in range(status.HOSTED_SHOWN + 5))
    usage = Usage(10 << 20, (RepositoryUse("private/secret", 1, 1, 1), *repos))
    limits = {Quota.SIZE: 100 << 20, Quota.REPOSITORIES: 1000, Quota.MANIFESTS: 10}
    view = status.hosted_view(usage, limits, lambda name: name.startswith("acme/"))
    assert [r.name for r in view.repositories] == [r.name for r in repos[: status.HOSTED_SHOWN]]
    assert view.more == 5
    bars = {bar.quota: bar for bar in view.quotas}
    assert (bars["max_size"].use, bars["max_size"].limit, bars["max_size"].used) == ("10.0 MiB", "100.0 MiB", "10%")
    assert bars["max_repositories"].use == str(len(repos) + 1)  # a total: it names no repository
    assert bars["max_manifests_per_repository"].used_percent == 100.0  # the fullest repository, capped
    html = status.render_view(
        status.StatusView(
            clock="now",
            refresh_seconds=10,
            cache=status.CacheUse("0 B", "1 GiB", 0.0, "0%", "0", "0"),
            hits=status.HitRatio("none yet", "0", ()),
            traffic=status.Traffic("0 B", "0 B", "0", "0"),
            upstreams=(),
            pulls=(),
            errors=(),
            note="",
            hosted=view,
        )
    )
    assert "private/secret" not in html
    assert "and 5 more" in html
