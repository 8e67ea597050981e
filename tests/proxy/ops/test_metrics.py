"""/metrics: what Prometheus sees move as real pulls go through the mirror, with one worker or two."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

GIB = 1 << 30


class Scrape:
    """One scrape of /metrics, parsed as Prometheus parses it."""

    def __init__(self, proxy: Proxy) -> None:
        response = httpx.get(f"{proxy.url}/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        self.families = list(text_string_to_metric_families(response.text))
        self.samples = [sample for family in self.families for sample in family.samples]

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels`."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
        )


def pull(proxy: Proxy, repo: str, tag: str, blobs: list[str]) -> None:
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        client.get(f"/v2/{repo}/manifests/{tag}").raise_for_status()
        for digest in blobs:
            client.get(f"/v2/{repo}/blobs/{digest}").raise_for_status()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_pulls_move_request_cache_byte_and_latency_metrics() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        _, blobs = upstream.add_image("acme/app", "1", layer_sizes=[300_000, 5000])
        manifest_size = len(httpx.get(f"{upstream.url}/v2/acme/app/manifests/1").content)
        blob_bytes = sum(len(upstream.blob(digest)) for digest in blobs)
        upstream.reset_log()

        pull(proxy, "acme/app", "1", blobs)
        pull(proxy, "acme/app", "1", blobs)
        assert httpx.get(f"{proxy.url}/v2/acme/app/manifests/nope").status_code == 404
        metrics = Scrape(proxy)

        assert all(family.name.startswith("pullproxy_") for family in metrics.families)
        assert metrics("pullproxy_requests_total", route="manifest", status="200") == 2
        assert metrics("pullproxy_requests_total", route="manifest", status="404") == 1
        assert metrics("pullproxy_requests_total", route="blob", status="200") == 6
        assert metrics("pullproxy_cache_requests_total", kind="manifest", outcome="miss") == 1
        assert metrics("pullproxy_cache_requests_total", kind="manifest", outcome="hit") == 1
        assert metrics("pullproxy_cache_requests_total", kind="blob", outcome="miss") == 3
        assert metrics("pullproxy_cache_requests_total", kind="blob", outcome="hit") == 3
        assert metrics("pullproxy_cache_served_bytes_total", kind="manifest") == manifest_size
        assert metrics("pullproxy_cache_served_bytes_total", kind="blob") == blob_bytes
        assert metrics("pullproxy_upstream_fetched_bytes_total", upstream="docker.io") == manifest_size + blob_bytes
        upstream_requests = len(upstream.requests())
        assert upstream_requests == 1 + len(blobs) + 1  # the unknown tag was asked for too
        assert metrics("pullproxy_upstream_request_duration_seconds_count", upstream="docker.io") == upstream_requests
        assert metrics("pullproxy_upstream_request_duration_seconds_sum", upstream="docker.io") > 0
        assert metrics("pullproxy_upstream_errors_total", upstream="docker.io") == 0
        assert metrics("pullproxy_cache_entries") == 1 + len(blobs)
        assert manifest_size + blob_bytes <= metrics("pullproxy_cache_size_bytes") <= GIB
        assert metrics("pullproxy_cache_limit_bytes") == GIB
        assert metrics("pullproxy_downloads_in_flight") == 0


def test_requests_are_labelled_by_route_never_by_path() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        manifest, _ = upstream.add_image("acme/app", "1")
        paths = [
            "/v2/",
            "/v2/_catalog",
            "/v2/acme/app/manifests/1",
            f"/v2/acme/app/manifests/{manifest}",
            "/v2/acme/app/blobs/sha256:" + "0" * 64,
            "/v2/acme/app/tags/list",
            f"/v2/acme/app/referrers/{manifest}",
            "/token",
            "/no/such/thing",
        ]
        for path in paths:
            httpx.get(f"{proxy.url}{path}", timeout=10)
        metrics = Scrape(proxy)
        routes = {sample.labels["route"] for sample in metrics.samples if sample.name == "pullproxy_requests_total"}
        assert routes == {"base", "catalog", "manifest", "blob", "tags", "referrers", "token", "other"}
        assert metrics("pullproxy_requests_total", route="manifest") == 2
        assert metrics("pullproxy_requests_total", route="blob", status="404") == 1


def test_revalidated_and_stale_answers_and_upstream_errors_are_counted() -> None:
    with FaultyRegistry() as upstream, Proxy({"cache": {"tag_ttl": "0s"}}, upstream_url=upstream.url) as proxy:
        upstream.add_image("acme/app", "1")
        for _ in range(2):
            httpx.get(f"{proxy.url}/v2/acme/app/manifests/1", timeout=10).raise_for_status()
        upstream.fail(503, path="/manifests/")
        httpx.get(f"{proxy.url}/v2/acme/app/manifests/1", timeout=10).raise_for_status()
        metrics = Scrape(proxy)

        assert metrics("pullproxy_requests_total", route="manifest", status="200") == 3
        for outcome in ("miss", "revalidated", "stale"):
            assert metrics("pullproxy_cache_requests_total", kind="manifest", outcome=outcome) == 1, outcome
        assert metrics("pullproxy_upstream_errors_total", upstream="docker.io") == 1


def test_downloads_in_flight_and_the_clients_waiting_on_them() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url) as proxy:
        _, (_, layer) = upstream.add_image("acme/app", "1", layer_sizes=[2 << 20])
        upstream.slow(digest=layer, chunk_size=64 << 10, chunk_delay=0.1)  # about 3 s
        threads = [
            threading.Thread(target=lambda: httpx.get(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=60))
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: Scrape(proxy)("pullproxy_download_clients") == 3, timeout=10)
            assert Scrape(proxy)("pullproxy_downloads_in_flight") == 1
        finally:
            for thread in threads:
                thread.join(60)
        metrics = Scrape(proxy)
        assert metrics("pullproxy_downloads_in_flight") == 0
        assert metrics("pullproxy_download_clients") == 0
        assert metrics("pullproxy_cache_requests_total", kind="blob", outcome="miss") == 1
        assert metrics("pullproxy_cache_requests_total", kind="blob", outcome="joined") == 2
        assert upstream.gets(layer) == 1


def test_evictions_are_counted() -> None:
    with FaultyRegistry() as upstream, Proxy({"cache": {"max_size": "1MiB"}}, upstream_url=upstream.url) as proxy:
        for tag in "1234":
            _, blobs = upstream.add_image("acme/app", tag, layer_sizes=[400_000])
            pull(proxy, "acme/app", tag, blobs)
        metrics = Scrape(proxy)
        assert metrics("pullproxy_cache_evictions_total") >= 2
        assert metrics("pullproxy_cache_size_bytes") <= metrics("pullproxy_cache_limit_bytes") == 1 << 20


def _metrics_pids(proxy: Proxy) -> set[int]:
    """The workers that answered a scrape, from the access log."""
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    return {line["pid"] for line in lines if line.get("path") == "/metrics"}


def test_two_workers_report_the_sum_of_both() -> None:
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url, args=["--workers", "2"]) as proxy:
        _, blobs = upstream.add_image("acme/app", "1", layer_sizes=[100_000, 200_000])
        fetches = 12

        def fetch(path: str) -> None:
            # A fresh connection each, so the kernel spreads them over both workers.
            httpx.get(f"{proxy.url}{path}", timeout=30).raise_for_status()

        paths = [f"/v2/acme/app/blobs/{blobs[i % len(blobs)]}" for i in range(fetches)]
        threads = [threading.Thread(target=fetch, args=(path,)) for path in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        scrapes: list[Scrape] = []
        for _ in range(5):  # until both workers answered a scrape
            batch = [threading.Thread(target=lambda: scrapes.append(Scrape(proxy))) for _ in range(8)]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join(30)
            if len(_metrics_pids(proxy)) == 2:
                break
        assert len(_metrics_pids(proxy)) == 2, "both workers should have answered a scrape"
        for metrics in scrapes:
            assert metrics("pullproxy_requests_total", route="blob", status="200") == fetches
            assert metrics("pullproxy_cache_requests_total", kind="blob") == fetches
            assert metrics("pullproxy_cache_limit_bytes") == GIB  # the most recent value, not a sum over workers
            assert metrics("pullproxy_cache_entries") == len(blobs)
            assert metrics("pullproxy_downloads_in_flight") == 0
        fetched = scrapes[-1]("pullproxy_upstream_fetched_bytes_total", upstream="docker.io")
        assert fetched == sum(len(upstream.blob(digest)) for digest in blobs)  # each blob fetched once, by either


def test_a_killed_workers_downloads_stop_counting() -> None:
    """uvicorn replaces a dead worker; the new one drops the dead one's live gauges."""
    with FaultyRegistry() as upstream, Proxy(upstream_url=upstream.url, args=["--workers", "2"]) as proxy:
        _, (_, layer) = upstream.add_image("acme/app", "1", layer_sizes=[4 << 20])
        upstream.slow(digest=layer, chunk_size=64 << 10, chunk_delay=0.5)  # half a minute

        def pull_cut_short() -> None:
            with contextlib.suppress(httpx.HTTPError):  # its worker is killed
                httpx.get(f"{proxy.url}/v2/acme/app/blobs/{layer}", timeout=60)

        client = threading.Thread(target=pull_cut_short, daemon=True)
        client.start()
        wait_for(lambda: Scrape(proxy)("pullproxy_downloads_in_flight") == 1)

        fetching = _holder_of(proxy.cache_dir / "partial", layer.replace(":", "-") + ".data")
        os.kill(fetching, signal.SIGKILL)
        wait_for(lambda: Scrape(proxy)("pullproxy_downloads_in_flight") == 0)
        upstream.clear_faults()
        client.join(60)


def _holder_of(directory: Path, name: str) -> int:
    """The pid of the process that has `directory/name` open."""
    target = str(directory / name)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process has {target} open")
