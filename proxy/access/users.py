"""Who may log in: users of an htpasswd file and inline `[[auth.user]]` entries (bcrypt).

bcrypt is slow on purpose (tens of milliseconds), so a successful check is remembered
for a few minutes under an HMAC of the credentials, together with the hash it was
checked against: authenticated pulls then cost a dictionary lookup, and a changed
password invalidates the entry at once. An unknown user is checked against a dummy
hash of the usual cost, so the answer takes as long as for a wrong password. The
htpasswd file is re-read when its mtime, size or inode changes (looked at no more than
once a second), without a restart. bcrypt runs in worker threads, never on the event
loop, with its own small limit so a flood of guesses cannot take the threads blob
reads need.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import bcrypt
import structlog
from anyio import CapacityLimiter, to_thread
from cachetools import TTLCache

from proxy.access.policy import User
from proxy.access.throttle import LoginThrottle

log = structlog.get_logger("pullproxy.auth")

RELOAD_INTERVAL = 1.0
VERIFIED_TTL = 300.0
MAX_PASSWORD = 72  # bytes bcrypt looks at; htpasswd truncates the same way
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")  # fullmatch


class Account(Protocol):
    """An inline user (`[[auth.user]]`, proxy.config.UserConfig), as `Users` reads it."""

    @property
    def name(self) -> str: ...

    @property
    def password_hash(self) -> str: ...

    @property
    def groups(self) -> Sequence[str]: ...


def is_bcrypt(hashed: str) -> bool:
    """Whether `hashed` is a bcrypt hash as `htpasswd -B` writes it (`$2y$05$...`)."""
    return _BCRYPT.fullmatch(hashed) is not None


def parse_htpasswd(text: str) -> dict[str, str]:
    """`user:bcrypt-hash` lines (what `htpasswd -B` writes); raises ValueError naming the bad line."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not name:
            raise ValueError(f"line {number} is not 'user:hash'")
        if not is_bcrypt(hashed):
            raise ValueError(f"line {number}: {name!r} has no bcrypt hash (write it with `htpasswd -B`)")
        users[name] = hashed
    return users


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a malformed hash never matches
        return False


def _cost(hashed: str) -> int:
    return int(hashed.split("$")[2])


class Users:
    def __init__(self, inline: Sequence[Account], htpasswd: Path | None, throttle: LoginThrottle) -> None:
        self._inline = {u.name: u.password_hash for u in inline}
        self._groups = {u.name: frozenset(u.groups) for u in inline}
        self._htpasswd = htpasswd
        self._file: dict[str, str] = {}
        self._file_id: tuple[int, int, int] | str | None = None  # "unusable" once it broke
        self._looked_at = 0.0
        self._hashes: dict[str, bytes] = {}
        self._dummy = b""
        self._secret = secrets.token_bytes(32)
        self._verified: TTLCache[bytes, bytes] = TTLCache(maxsize=4096, ttl=VERIFIED_TTL)
        self._limiter = CapacityLimiter(max(2, os.cpu_count() or 2))
        self.throttle = throttle

    async def load(self) -> None:
        """Read the htpasswd file and make the dummy hash (both blocking: in a thread)."""
        await to_thread.run_sync(self._reload)

    def user(self, name: str) -> User:
        """The user a token names (already authenticated): groups come from the config."""
        return User(name, self._groups.get(name, frozenset()))

    async def authenticate(self, name: str, password: str, client: str) -> User | None:
        """The user, if `password` is theirs; None for a wrong password or an unknown user alike."""
        if self._htpasswd is not None and time.monotonic() - self._looked_at >= RELOAD_INTERVAL:
            self._looked_at = time.monotonic()
            await to_thread.run_sync(self._reload)
        secret = password.encode()[:MAX_PASSWORD]
        key = hmac.digest(self._secret, name.encode() + b"\0" + secret, hashlib.sha256)
        stored = self._hashes.get(name)
        remembered = self._verified.get(key)
        if stored is not None and remembered is not None and hmac.compare_digest(remembered, stored):
            return self.user(name)
        await self.throttle.wait(client)
        ok = await to_thread.run_sync(_check, secret, stored or self._dummy, limiter=self._limiter)
        if ok and stored is not None:
            self._verified[key] = stored
            return self.user(name)
        failures = self.throttle.failed(client)
        log.warning("login failed", user=name, client=client, failures=failures, total=self.throttle.total_failures)
        return None

    def _reload(self) -> None:
        """Blocking: re-read the htpasswd file if it changed; inline users win over it."""
        if self._htpasswd is not None:
            try:
                stat = os.stat(self._htpasswd)
                file_id = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if file_id != self._file_id:
                    self._file = parse_htpasswd(self._htpasswd.read_text())
                    self._file_id = file_id
                    log.info("htpasswd loaded", path=str(self._htpasswd), users=len(self._file))
            except (OSError, ValueError) as exc:
                # Fail closed: a file that vanished or broke grants nothing until it is fixed.
                if self._file_id != "unusable":
                    log.error("htpasswd unusable, its users cannot log in", path=str(self._htpasswd), why=str(exc))
                self._file, self._file_id = {}, "unusable"
        hashes = {**self._file, **self._inline}
        self._hashes = {name: hashed.encode() for name, hashed in hashes.items()}
        costs = Counter(_cost(h) for h in hashes.values())
        cost = costs.most_common(1)[0][0] if costs else 4  # no users: no timing to hide
        if not self._dummy or _cost(self._dummy.decode()) != cost:
            self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
