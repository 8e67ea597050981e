"""The pull-through mirror: manifests, blobs, tags and referrers from the cache, else the upstream."""

from proxy.mirror.blobs import Blob
from proxy.mirror.mirror import Mirror, open_mirror
from proxy.mirror.outcome import Outcome

__all__ = ["Blob", "Mirror", "Outcome", "open_mirror"]
