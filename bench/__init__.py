"""otel-ebpf benchmarks: `make bench` (bench/run.py)."""
import os
import sys

# The benchmarks import the agent (otel_ebpf) and the tests' helpers (tests.support: the
# agent runner, the OTLP receiver) from the repository root.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
