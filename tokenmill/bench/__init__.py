"""Benchmarks: offline throughput and latency against peers measured in the same run."""
