"""Peer benchmarks (run by hand; see README.md)."""
