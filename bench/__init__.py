"""Latency and throughput harness: named scenarios → JSON results + a table."""
