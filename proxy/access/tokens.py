"""Bearer tokens of the Docker token flow: short-lived HS256 JWTs this mirror signs and checks.

A token names the repositories (full names, see `proxy.access`) its holder may pull, so
checking one on a request needs no password check and no lookup. Every worker process
must sign with the same key: from the configuration, else one generated once into the
cache directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

SERVICE = "pullproxy"
KEY_FILE = "token.key"
_ALGORITHM = "HS256"


class InvalidToken(Exception):
    """Not signed by us, expired, for another service, or malformed."""


@dataclass(frozen=True, slots=True)
class Grant:
    subject: str | None  # the user's name; None for a token handed out anonymously
    repositories: frozenset[str]  # those it may pull
    actions: Mapping[str, frozenset[str]] = field(default_factory=dict)  # every action, by repository

    def allows(self, name: str, action: str) -> bool:
        return action in self.actions.get(name, ()) or (action == "pull" and name in self.repositories)


class Tokens:
    def __init__(self, key: bytes, ttl: float) -> None:
        self._key = key
        self.ttl = int(ttl)

    def issue(
        self, subject: str | None, repositories: Iterable[str] | Mapping[str, Iterable[str]]
    ) -> dict[str, object]:
        """The `/token` answer: the token (twice, as clients read either field), its lifetime.

        `repositories`: names to pull, or the actions granted by name (pull, push, delete).
        """
        now = int(time.time())
        if isinstance(repositories, Mapping):
            granted = {name: sorted(set(actions)) for name, actions in repositories.items()}
        else:
            granted = {name: ["pull"] for name in repositories}
        claims = {
            "iss": SERVICE,
            "aud": SERVICE,
            "sub": subject or "",
            "iat": now,
            "exp": now + self.ttl,
            "jti": secrets.token_hex(8),
            "access": [
                {"type": "repository", "name": name, "actions": actions} for name, actions in sorted(granted.items())
            ],
        }
        import jwt  # here: PyJWT loads cryptography (10 MiB), which a mirror that issues no tokens never needs

        token = jwt.encode(claims, self._key, algorithm=_ALGORITHM)
        issued = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued}

    def verify(self, token: str) -> Grant:
        import jwt

        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=SERVICE,
                issuer=SERVICE,
                options={"require": ["exp", "iat", "aud", "iss", "sub"]},
            )
            actions = {
                str(entry["name"]): frozenset(str(a) for a in entry.get("actions", []))
                for entry in claims.get("access", [])
                if entry.get("type") == "repository"
            }
        except (jwt.InvalidTokenError, AttributeError, KeyError, TypeError) as exc:
            raise InvalidToken(str(exc)) from None
        repositories = frozenset(name for name, granted in actions.items() if "pull" in granted)
        return Grant(claims["sub"] or None, repositories, actions)


def load_or_create_key(directory: Path) -> bytes:
    """Blocking: the key kept in `directory`, made by whichever worker gets there first."""
    path = directory / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes().strip()
    staging = directory / f"{KEY_FILE}.{os.getpid()}"
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(secrets.token_hex(32))
    try:
        os.link(staging, path)  # fails if another worker was first; never half-written
    except FileExistsError:
        pass
    finally:
        staging.unlink()
    return path.read_bytes().strip()
