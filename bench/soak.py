"""Soak: mixed load over every target for a while with the agent, then its RSS, spans, losses.

    .venv/bin/python bench/soak.py [--minutes 10]

PostgreSQL, MariaDB, nginx and HTTPS (curl) run the demo workloads; the agent runs as
its own process exporting OTLP to a receiver here that only counts. Prints RSS after
a one-minute warm-up and at the end (growth should stay within 5 %), spans exported,
events lost, spans dropped, and whether the agent stayed up.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402

from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.otlp import OtlpReceiver  # noqa: E402

SERVERS = (("postgres", "postgres"), ("mysql", "mariadb"), ("nginx", "nginx"), ("openssl", "https"))


class CountingReceiver(OtlpReceiver):
    """Counts spans instead of keeping them: a soak must not measure the receiver's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.span_count = 0

    def _add(self, target: list, request) -> None:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            with self._lock:
                self.span_count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return
        with self._lock:  # keep only the latest metrics/logs request
            target[:] = [request]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    receiver = CountingReceiver().start()
    servers = []
    for target, module in SERVERS:
        try:
            servers.append((target, importlib.import_module(f"otel_ebpf.servers.{module}").demo_server()))
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            print(f"soak: {target} not started: {exc}")
    targets = ",".join(t for t, _ in servers)
    agent = AgentProcess("--targets", targets, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
                                                    "OTEL_METRIC_EXPORT_INTERVAL": "10000"})
    stop = threading.Event()
    counts: collections.Counter[str] = collections.Counter()
    agent.start()
    pid = agent.proc.pid  # type: ignore[union-attr]
    workers = [threading.Thread(target=s.workload, args=(stop, counts), daemon=True) for _, s in servers]
    for w in workers:
        w.start()
    t0 = time.monotonic()
    samples = []
    try:
        warm = min(60.0, args.minutes * 60 / 4)
        time.sleep(warm)
        rss_start, cpu_start, t_start = rss_kib(pid), cpu_seconds(pid), time.monotonic()
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(min(30.0, args.minutes * 60))
            samples.append(rss_kib(pid))
            print(f"  {time.monotonic() - t0:6.0f} s  RSS {samples[-1] / 1024:6.1f} MiB  spans {receiver.span_count}",
                  flush=True)
        rss_end, cpu_end, t_end = rss_kib(pid), cpu_seconds(pid), time.monotonic()
        alive = agent.proc.poll() is None  # type: ignore[union-attr]
        status = agent.health()[1] if alive else {}
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        rc = agent.stop()
        for _, s in servers:
            s.stop()
        receiver.stop()
    growth = (rss_end - rss_start) / rss_start * 100 if rss_start else 0.0
    print(f"\nsoak: {args.minutes:g} min over {targets}")
    print(f"  sent: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
    print(f"  agent RSS after warm-up {rss_start / 1024:.1f} MiB, at the end {rss_end / 1024:.1f} MiB "
          f"({growth:+.1f} %, target <= 5 %), max {max(samples or [rss_end]) / 1024:.1f} MiB")
    print(f"  agent CPU {100 * (cpu_end - cpu_start) / (t_end - t_start):.1f} % of one core")
    print(f"  spans received {receiver.span_count}; events seen {status.get('events_seen')}, "
          f"lost {status.get('events_lost')}; spans dropped {status.get('spans_dropped')}")
    print(f"  agent alive to the end: {alive}; exit code after SIGTERM: {rc}")
    ok = alive and rc == 0 and growth <= 5.0 and status.get("events_lost", 1) == 0
    print(f"  {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
