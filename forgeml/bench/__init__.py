"""Benchmark harness: side-by-side, alternating latency and memory measurements."""
