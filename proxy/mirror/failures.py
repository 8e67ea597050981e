"""What an upstream failure means to the client of a mirrored repository."""

from __future__ import annotations

from cache import digests
from proxy import errors
from proxy.routing import Route
from proxy.upstream.client import (
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
    UpstreamOffline,
    UpstreamUnavailable,
)


def registry_error(exc: UpstreamError, route: Route, reference: str, blob: bool = False) -> errors.RegistryError:
    name = route.prefix + route.repo
    if isinstance(exc, UpstreamOffline):
        return errors.offline(f"{name}@{reference}" if digests.is_digest(reference) else f"{name}:{reference}")
    if isinstance(exc, UpstreamNotFound):
        return errors.blob_unknown(reference) if blob else errors.manifest_unknown(name, reference)
    if isinstance(exc, UpstreamDenied):
        kind = errors.BlobUnknown if blob else errors.ManifestUnknown
        why = f"{route.upstream.name} refused access to {route.repo} (check the upstream's credentials)"
        return kind(why, {"name": name, "reference": reference})
    if isinstance(exc, UpstreamUnavailable):
        if exc.status == 429:
            return errors.TooManyRequests(f"{exc}", exc.retry_after)
        return errors.Unavailable(f"{exc}", exc.retry_after or "5")  # e.g. the rest of a backoff window
    return errors.bad_upstream(f"{exc}")


def parsed(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest a client sent; 400 DIGEST_INVALID when it is not one."""
    try:
        return digests.parse(digest)
    except digests.InvalidDigest:
        raise errors.digest_invalid(digest) from None
