"""The haproxy harness spreads requests round-robin, says who served what, and routes around a dead backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from .haproxy import HAProxy


class _Named(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Named

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[list[_Named]]:
    servers = [_Named(f"b{i}") for i in range(3)]
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)


def test_haproxy_spreads_requests_round_robin_and_logs_which_backend_served_each(backends: list[_Named]) -> None:
    with HAProxy([b.url for b in backends]) as lb:
        for name in lb.names:
            lb.wait_status(name, "UP")
        lb.reset_log()
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            answers = [client.get(f"/v2/x/blobs/{i}").text for i in range(9)]
        assert sorted(answers) == sorted(["b0", "b1", "b2"] * 3)
        assert answers[:3] != [answers[0]] * 3  # consecutive requests on one connection go to different backends
        served = lb.served_by("/v2/x/blobs/")
        assert served == {"r0": 3, "r1": 3, "r2": 3}
        assert all(r.status == 200 and r.method == "GET" for r in lb.requests() if "/blobs/" in r.path)
        assert sum(int(row["hrsp_2xx"]) for row in lb.server_stats().values()) >= 9


def test_haproxy_takes_a_dead_backend_out_of_the_rotation(backends: list[_Named]) -> None:
    with HAProxy([b.url for b in backends]) as lb:
        for name in lb.names:
            lb.wait_status(name, "UP")
        backends[1].shutdown()
        backends[1].server_close()
        lb.wait_status("r1", "DOWN")
        lb.reset_log()
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            answers = {client.get(f"/v2/{i}").text for i in range(6)}
        assert answers == {"b0", "b2"}
        assert set(lb.served_by("/v2/")) == {"r0", "r2"}
