"""Benchmark of pullproxy against CNCF distribution 2.8 in proxy mode (see bench/README.md)."""
