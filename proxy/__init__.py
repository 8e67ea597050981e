"""pullproxy's HTTP side: the V2 API, routing to upstreams, upstream clients."""
