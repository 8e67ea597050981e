"""On-disk content cache: blobs and manifests by digest, tag records, downloads in flight.

Nothing here knows about HTTP or upstream registries; `proxy/` drives it.
"""
