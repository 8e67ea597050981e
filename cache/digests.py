"""Content digests as the OCI image spec defines them (`algorithm:hex`)."""

from __future__ import annotations

import hashlib
import re

# Registered algorithms only: anything else cannot be verified, so it is refused up front.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha512):([a-f0-9]+)")  # always fullmatch: `$` admits a final "\n"


class InvalidDigest(ValueError):
    """A string that is not a digest this cache can verify."""


def parse(digest: str) -> tuple[str, str]:
    """Split `digest` into (algorithm, hex), refusing anything unverifiable."""
    match = _DIGEST.fullmatch(digest)
    if match is None or len(match.group(2)) != _HEX_LENGTH[match.group(1)]:
        raise InvalidDigest(f"invalid digest {digest!r}")
    return match.group(1), match.group(2)


def is_digest(reference: str) -> bool:
    """A manifest reference with a colon is a digest, never a tag (tags cannot hold one)."""
    return ":" in reference


class Check:
    """Bytes hashed as they come, to be compared with the digest they should have."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self._algorithm = parse(digest)[0]
        self._hash = hashlib.new(self._algorithm)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    @property
    def actual(self) -> str:
        """The digest of what was hashed so far."""
        return f"{self._algorithm}:{self._hash.hexdigest()}"

    def matches(self) -> bool:
        return self.actual == self.digest


def of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def matches(digest: str, data: bytes) -> bool:
    algorithm, hex_ = parse(digest)
    return hashlib.new(algorithm, data).hexdigest() == hex_
