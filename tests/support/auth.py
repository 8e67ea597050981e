"""Helpers for access-control tests: bcrypt hashes, challenges, tokens, source addresses."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import bcrypt
import httpx


def password_hash(password: str, rounds: int = 4) -> str:
    """What `htpasswd -B` writes (it uses $2y$; cost 4 keeps tests fast)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode().replace("$2b$", "$2y$", 1)


def user_entry(user: tuple[str, str], *groups: str, rounds: int = 4) -> dict[str, Any]:
    """An `[[auth.user]]` table for (name, password)."""
    return {"name": user[0], "password_hash": password_hash(user[1], rounds), "groups": list(groups)}


def challenge(response: httpx.Response) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer ...` header."""
    header = response.headers["WWW-Authenticate"]
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client_from(base_url: str, address: str, timeout: float = 30) -> httpx.Client:
    """A client whose connections come from `address` (any 127.x reaches 127.0.0.1 on Linux)."""
    return httpx.Client(base_url=base_url, timeout=timeout, transport=httpx.HTTPTransport(local_address=address))


def error_code(response: httpx.Response) -> str:
    return response.json()["errors"][0]["code"]
