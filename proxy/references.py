"""Image references as people write them: `[registry/]repository[:tag][@digest]`.

The registry part is the first component when it looks like a host (has a '.' or ':' or
is `localhost`), as docker and podman decide; it names a configured upstream, and a
reference without one means the default upstream. `Router.resolve` routes one the same
way as requests are, so `docker.io/alpine` becomes `library/alpine` there.
This module imports nothing else from `proxy`, so the configuration can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cache import digests

# Matched with fullmatch: `$` would admit a final "\n".
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_PLATFORM = re.compile(r"[a-z0-9_-]+/[a-z0-9_-]+(?:/[a-z0-9_.-]+)?")
DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class ImageRef:
    registry: str | None  # as written; None: the default upstream
    repository: str  # as written, e.g. "alpine" or "acme/app"
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask a registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def parse(text: str) -> ImageRef:
    """Split a reference; raises ValueError with a message naming what is wrong."""
    rest, _, digest = text.strip().partition("@")
    if digest:
        try:
            digests.parse(digest)
        except digests.InvalidDigest as exc:
            raise ValueError(f"{text!r}: {exc}") from None
    name, tag = rest, None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
        if not valid_tag(tag):
            raise ValueError(f"{text!r}: {tag!r} is not a valid tag")
    registry = None
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, name = first.lower(), remainder
    if not name or name != name.lower() or any(not part for part in name.split("/")):
        raise ValueError(f"{text!r} is not an image reference such as 'docker.io/library/alpine:3.19'")
    return ImageRef(registry, name, tag, digest or None)


def valid_tag(text: str) -> bool:
    """A tag as the distribution spec defines it (and never a digest: no colon)."""
    return _TAG.fullmatch(text) is not None


def valid_platform(text: str) -> bool:
    """`os/arch` or `os/arch/variant`, e.g. linux/arm64/v8."""
    return _PLATFORM.fullmatch(text) is not None
