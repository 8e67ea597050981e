"""Password checks: equal timing for unknown users, the bcrypt cache, htpasswd reloads,
slowing down guessers, and bcrypt off the event loop. Hashes here have a realistic cost,
so that what these tests time is bcrypt, not HTTP."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.auth import client_from, password_hash, user_entry
from tests.support.faulty import FaultyRegistry
from tests.support.proxy import Proxy

COST = 10  # ~0.1 s a check here, far above a request's own time
ALICE = ("alice", "alice-pw")
BOB = ("bob", "bob-pw")
SLOW = ("slow", "slow-pw")  # cost 13: a check long enough to watch the event loop meanwhile
PRIVATE = "/v2/acme/app/manifests/1"
PUBLIC = "/v2/library/alpine/manifests/1"


@pytest.fixture(scope="module")
def hub() -> Iterator[FaultyRegistry]:
    with FaultyRegistry() as registry:
        registry.add_image("acme/app", "1")
        registry.add_image("library/alpine", "1")
        yield registry


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "htpasswd"
    path.write_text(f"carol:{password_hash('carol-1', COST)}\n")
    return path


@pytest.fixture(scope="module")
def proxy(hub: FaultyRegistry, htpasswd: Path) -> Iterator[Proxy]:
    config = {
        "auth": {
            "htpasswd": str(htpasswd),
            "user": [user_entry(ALICE, rounds=COST), user_entry(BOB, rounds=COST), user_entry(SLOW, rounds=13)],
        },
        "access": [
            {"repository": "docker.io/library/*", "pull": "anyone"},
            {"repository": "**", "pull": "authenticated"},
        ],
    }
    with Proxy(config, upstream_url=hub.url) as running:
        yield running


def timed(http: httpx.Client, path: str, auth: tuple[str, str]) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = http.get(path, auth=auth)
    return time.perf_counter() - started, response


def test_unknown_user_takes_as_long_as_a_wrong_password(proxy: Proxy) -> None:
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    bodies = set()
    for i in range(4):  # each attempt from its own address, so the guessing brake stays out of it
        for j, (kind, user) in enumerate([("known", ALICE[0]), ("unknown", "nobody")]):
            with client_from(proxy.url, f"127.0.1.{10 * i + j}") as http:
                took, response = timed(http, PRIVATE, (user, "wrong-password"))
            assert response.status_code == 401
            bodies.add(response.content)
            times[kind].append(took)
    known, unknown = statistics.median(times["known"]), statistics.median(times["unknown"])
    assert len(bodies) == 1
    assert known > 0.03, "a wrong password should cost a bcrypt check"
    assert 0.5 < unknown / known < 2, times


def test_successful_checks_are_cached(proxy: Proxy) -> None:
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        first, response = timed(http, PRIVATE, ALICE)
        assert response.status_code == 200
        later = [timed(http, PRIVATE, ALICE) for _ in range(10)]
    assert all(r.status_code == 200 for _, r in later)
    assert first > 0.03
    assert sum(t for t, _ in later) < first, "each later request paid for bcrypt again"


def test_changed_htpasswd_applies_without_restart(proxy: Proxy, htpasswd: Path) -> None:
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        assert http.get(PRIVATE, auth=("carol", "carol-1")).status_code == 200  # and now cached
        htpasswd.write_text(f"carol:{password_hash('carol-2', 4)}\ndan:{password_hash('dan-1', 4)}\n")
        deadline = time.monotonic() + 5
        while http.get(PRIVATE, auth=("carol", "carol-1")).status_code != 401:
            assert time.monotonic() < deadline, "the old password still works"
            time.sleep(0.2)
        assert http.get(PRIVATE, auth=("carol", "carol-2")).status_code == 200
        assert http.get(PRIVATE, auth=("dan", "dan-1")).status_code == 200
        htpasswd.write_text("")
        time.sleep(1.1)
        assert http.get(PRIVATE, auth=("dan", "dan-1")).status_code == 401


def test_repeated_failures_from_one_address_are_slowed_and_logged(proxy: Proxy) -> None:
    with client_from(proxy.url, "127.0.2.1") as guesser, client_from(proxy.url, "127.0.2.2") as other:
        times = [timed(guesser, PRIVATE, (BOB[0], f"guess-{i}"))[0] for i in range(7)]
        elsewhere, response = timed(other, PRIVATE, (BOB[0], "typo"))
        assert response.status_code == 401
        assert max(times[:5]) < 0.4  # five free tries
        assert times[5] > 0.5 and times[6] > 1.0  # then a growing wait
        assert elsewhere < 0.4  # other addresses are not slowed
        # The right password still works from the guesser's address, after the wait.
        assert guesser.get(PRIVATE, auth=BOB).status_code == 200
    failures = [line for line in proxy.log_text().splitlines() if '"login failed"' in line]
    assert any('"client": "127.0.2.1"' in line and '"failures": 7' in line for line in failures)
    assert any('"client": "127.0.2.2"' in line and '"failures": 1' in line for line in failures)
    assert not any("guess-" in line for line in proxy.log_text().splitlines())


def test_bcrypt_runs_off_the_event_loop(proxy: Proxy) -> None:
    # Told by the order the answers come in, not by a clock: a check on the loop would hold the
    # public pull until the slow password check had answered.
    finished: list[str] = []
    with httpx.Client(base_url=proxy.url, timeout=30) as http, httpx.Client(base_url=proxy.url, timeout=30) as other:
        http.get(PUBLIC).raise_for_status()

        def check() -> None:
            other.get(PRIVATE, auth=(SLOW[0], "wrong"))
            finished.append("password check")

        checking = threading.Thread(target=check)
        checking.start()
        time.sleep(0.15)  # the slow check is under way
        response = http.get(PUBLIC, auth=("x", "y"))
        finished.append("public pull")
        checking.join()
    assert response.status_code == 200
    assert finished == ["public pull", "password check"], "a public pull waited for someone's password check"
