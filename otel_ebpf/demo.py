"""`otel-ebpf demo`: local servers with load, the agent watching them, spans on the console."""
from __future__ import annotations

import collections
import importlib
import signal
import sys
import threading
import time

from .config import load
from .contract import DURATION_BUCKETS
from .targets.base import SpanData

# target -> module in otel_ebpf.servers with a demo_server() function
DEMO_SERVERS = {"postgres": "postgres", "mysql": "mariadb", "nginx": "nginx", "openssl": "https"}


def run_demo(seconds: float = 20.0, targets: list[str] | None = None) -> int:
    from .doctor import fatal_problems
    from .agent import Agent

    problems = fatal_problems()
    if problems:
        print("otel-ebpf demo cannot run: " + "; ".join(problems) + " (run `make setup` as root)", file=sys.stderr)
        return 1
    wanted = [t for t in (targets or list(DEMO_SERVERS)) if t in DEMO_SERVERS]
    servers = []
    for target in wanted:
        try:
            module = importlib.import_module(f"otel_ebpf.servers.{DEMO_SERVERS[target]}")
        except ModuleNotFoundError:
            continue  # this build has no demo for that target
        print(f"demo: starting {target} ...", flush=True)
        try:
            servers.append((target, module.demo_server()))
        except Exception as exc:  # noqa: BLE001 - one server failing should not end the demo
            print(f"demo: {target} could not start: {exc}", file=sys.stderr)
    if not servers:
        print("demo: no server could start", file=sys.stderr)
        return 1

    spans: list[SpanData] = []
    config = load({"targets": [t for t, _ in servers], "output": "console", "slow_threshold_ms": 250,
                   "health_addr": "127.0.0.1:0"}, env={})
    agent = Agent(config, span_observer=spans.extend)
    runner = threading.Thread(target=agent.run, name="otel-ebpf-agent")
    runner.start()
    if not agent.ready.wait(60):
        print("demo: the agent did not start", file=sys.stderr)
    stop = threading.Event()
    counts: collections.Counter[str] = collections.Counter()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    workers = [threading.Thread(target=s.workload, args=(stop, counts), daemon=True) for _, s in servers]
    print(f"demo: load running for {seconds:.0f} s (Ctrl-C stops); one line per span:", flush=True)
    started = time.monotonic()
    for w in workers:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in workers:
        w.join(10)
    time.sleep(0.5)  # let the last records drain
    agent.read_stats()
    status = agent.status()
    agent.stop_event.set()
    runner.join(15)
    signal.signal(signal.SIGINT, previous)
    for _, s in servers:
        s.stop()
    print_summary(counts, spans, status, time.monotonic() - started)
    return 0


def print_summary(counts: collections.Counter, spans: list[SpanData], status: dict, elapsed: float) -> None:
    print(f"\n=== otel-ebpf demo: {elapsed:.0f} s ===")
    print("sent:")
    for kind, n in sorted(counts.items()):
        print(f"  {kind:<22} {n:>7}")
    by_system = collections.Counter(
        str(s.attributes.get("db.system.name") or s.attributes.get("url.scheme") or s.target) for s in spans)
    errors = sum(1 for s in spans if s.error)
    print(f"spans: {len(spans)} ({errors} errors): " + ", ".join(f"{k} {v}" for k, v in sorted(by_system.items())))
    print(f"agent: {status['probes_attached']} probes, {status['events_seen']} events, "
          f"{status['events_lost']} lost, {status['spans_dropped']} spans dropped")
    print("slowest:")
    for s in sorted(spans, key=lambda s: s.end_ns - s.start_ns, reverse=True)[:5]:
        print(f"  {(s.end_ns - s.start_ns) / 1e6:9.1f} ms  {s.name}  (pid {s.resource_pid})")
    print("latency (all spans):")
    buckets = [0] * (len(DURATION_BUCKETS) + 1)
    for s in spans:
        d = s.duration_s
        buckets[next((i for i, b in enumerate(DURATION_BUCKETS) if d <= b), len(DURATION_BUCKETS))] += 1
    top = max(buckets) or 1
    for i, n in enumerate(buckets):
        if n:
            label = f"<= {DURATION_BUCKETS[i] * 1000:g} ms" if i < len(DURATION_BUCKETS) else "> 10 s"
            print(f"  {label:>12} {'#' * max(1, round(40 * n / top)):<40} {n}")
