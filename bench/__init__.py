"""otel-ebpf benchmarks: `make bench` (bench/run.py)."""
