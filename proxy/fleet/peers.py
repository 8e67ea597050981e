"""This replica's identity and the credentials replicas present to each other.

A peer request (one replica asking another for the bytes of a download it owns, or
forwarding an upload to the replica that holds it) carries a short-lived JWT signed with
the fleet's `peer_secret` (HS256), bound to the method and path it was made for, so a
captured one opens nothing else and is useless within a minute. Without `peer_secret`
peer requests are refused: a fleet without a secret still works, each replica fetching
on its own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass

from proxy.config import Config

HEADER = "X-Pullproxy-Peer"
_AUDIENCE = "pullproxy-peer"
_ALGORITHM = "HS256"
LIFETIME = 60.0  # seconds a peer credential is good for
_LEEWAY = 5.0  # clock difference between replicas that is tolerated


@dataclass(frozen=True, slots=True)
class Replica:
    """This process as the fleet knows it."""

    id: str  # unique per process start: a restarted replica is a new one
    url: str  # where other replicas reach it (`advertise_url`)


def this_replica(config: Config) -> Replica:
    """Its id (host name, pid and a random part) and its advertised URL."""
    coordination = config.coordination
    url = coordination.advertise_url if coordination and coordination.advertise_url else None
    if url is None:
        host = config.listen_host if config.listen_host not in ("0.0.0.0", "::", "") else socket.gethostname()
        scheme = "https" if config.tls_cert is not None else "http"
        url = f"{scheme}://{host}:{config.listen_port}"
    return Replica(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", url)


class PeerCredentials:
    """Issues and checks the credential of one peer request."""

    def __init__(self, secret: str | None, replica: Replica) -> None:
        # A fixed-length key whatever the secret's length (HS256 wants 32 bytes).
        self._key = hashlib.sha256(b"pullproxy-peer\0" + secret.encode()).digest() if secret else None
        self.replica = replica

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def issue(self, method: str, path: str) -> str:
        """The header value for a request of `method` on `path` (the path only, query included)."""
        if self._key is None:
            raise PermissionError("no [coordination] peer_secret: peer requests are off")
        import jwt  # PyJWT loads cryptography: only once a peer request is made

        now = time.time()
        claims = {"aud": _AUDIENCE, "iss": self.replica.id, "iat": int(now), "exp": int(now + LIFETIME)}
        return jwt.encode({**claims, "req": f"{method.upper()} {path}"}, self._key, algorithm=_ALGORITHM)

    def check(self, value: str | None, method: str, path: str) -> str | None:
        """The id of the replica that made this request, or None if the credential is missing or wrong."""
        if self._key is None or not value:
            return None
        import jwt

        try:
            claims = jwt.decode(
                value,
                self._key,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                leeway=_LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.InvalidTokenError:
            return None
        if claims.get("req") != f"{method.upper()} {path}":
            return None
        issuer = claims["iss"]
        return issuer if isinstance(issuer, str) else None
