"""Soak: mixed load over every target for a while with the agent; has its RSS levelled off?

    .venv/bin/python bench/soak.py [--minutes 10] [--flat-mib-per-min 0.1] [--output FILE]

PostgreSQL, MariaDB, nginx and HTTPS (curl) run the demo workloads (otel_ebpf.servers.*:
demo_server()); the agent runs as shipped (bench/agent.py), exporting OTLP to a receiver
here that only counts. After a warm-up (a quarter of the soak, at most a minute) the
agent's RSS is sampled every 5 s. Reported:

- RSS after the warm-up and at the end (growth target ≤ 5 %), and whether it has levelled
  off: the least-squares slope of RSS over the last third of the sampled time (the samples
  after the warm-up; for 10 minutes, minutes 7 to 10), in MiB/min. Flat
  means |slope| ≤ --flat-mib-per-min (default 0.1) and the samples can resolve that (twice
  the slope's standard error within it; else "too noisy to tell"). Why 0.1 MiB/min: at
  that rate an agent at ~105 MiB would need 7.5 hours to reach the 150 MB target for RSS
  at work; a 10-minute soak cannot resolve much less (with 5-s samples over its last 3.3
  minutes, allocator noise of a few hundred KiB gives a standard error of about 0.03-0.05
  MiB/min). A longer soak (--minutes 60) resolves proportionally smaller slopes: a slope
  that stays below the threshold there is what "levelled off" should mean for a daemon.
- the agent's CPU (% of one core) at the soak's load, and its CPU per span exported;
- spans received, events lost, spans dropped; the sizes of the agent's caches (/healthz
  "caches") after the warm-up and at the end; whether the agent stayed up and exited 0.
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

from bench.agent import BenchAgent  # noqa: E402
from bench.procs import BenchError, install_cleanup, stop_all  # noqa: E402
from bench.readings import cpu_seconds, status_kb  # noqa: E402
from bench.receiver import CountingReceiver  # noqa: E402
from bench.report import Check, Table, fmt_num  # noqa: E402
from bench.stats import isnan, last_fraction, levelled_off  # noqa: E402

SERVERS = (("postgres", "postgres"), ("mysql", "mariadb"), ("nginx", "nginx"), ("openssl", "https"))
SAMPLE_S = 5.0
PRINT_S = 30.0
GROWTH_LIMIT_PCT = 5.0


def caches_text(before: dict, after: dict) -> str:
    """'resources 3 → 5, sql 120 → 130' from two /healthz "caches" objects."""
    keys = list(dict.fromkeys([*before, *after]))
    return ", ".join(f"{k} {before.get(k, '-')} → {after.get(k, '-')}" for k in keys) or "none reported"


def soak(minutes: float, flat: float, log=print) -> Table:
    receiver = CountingReceiver().start()
    servers = []
    for target, module in SERVERS:
        try:
            servers.append((target, importlib.import_module(f"otel_ebpf.servers.{module}").demo_server()))
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            log(f"soak: {target} not started: {exc}")
    targets = ",".join(t for t, _ in servers)
    agent = BenchAgent("--targets", targets, receiver=receiver, label="soak")
    stop = threading.Event()
    counts: collections.Counter[str] = collections.Counter()
    workers = [threading.Thread(target=s.workload, args=(stop, counts), daemon=True) for _, s in servers]
    xs: list[float] = []  # minutes since the soak started
    ys: list[float] = []  # RSS, MiB
    status0: dict = {}
    status: dict = {}
    alive, rc = False, None
    try:
        agent.start(timeout=60)
        pid = agent.pid
        for w in workers:
            w.start()
        t0 = time.monotonic()
        warm = min(60.0, minutes * 60 / 4)
        time.sleep(warm)
        status0 = agent.health()[1]
        rss_start, cpu_start, t_start = status_kb(pid, "VmRSS"), cpu_seconds(pid), time.monotonic()
        last_print = t_start
        while time.monotonic() - t0 < minutes * 60 and agent.proc.poll() is None:
            time.sleep(SAMPLE_S)
            xs.append((time.monotonic() - t0) / 60)
            ys.append(status_kb(pid, "VmRSS") / 1024)
            if time.monotonic() - last_print >= PRINT_S:
                last_print = time.monotonic()
                log(f"  {time.monotonic() - t0:6.0f} s  RSS {ys[-1]:6.1f} MiB  spans {receiver.span_count}")
        alive = agent.proc.poll() is None
        rss_end, cpu_end, t_end = status_kb(pid, "VmRSS"), cpu_seconds(pid), time.monotonic()
        status = agent.health()[1] if alive else {}
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        if agent.proc is not None:
            rc = agent.stop()
        for _, s in servers:
            s.stop()
        receiver.stop()

    growth = (rss_end - rss_start) / rss_start * 100 if rss_start else float("nan")
    slope, se, flat_ok = levelled_off(xs, ys, flat)
    cpu = cpu_end - cpu_start
    exported = status.get("spans_exported", 0) - status0.get("spans_exported", 0)
    table = Table(f"Soak: {minutes:g} min of mixed load over {targets}, the agent as shipped",
                  ["reading", "value"])
    table.rows += [
        ["sent", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))],
        ["agent RSS after the warm-up → at the end", f"{rss_start / 1024:.1f} → {rss_end / 1024:.1f} MiB "
                                                     f"({growth:+.1f} %), max {max(ys or [rss_end / 1024]):.1f} MiB"],
        ["RSS slope over the last third", f"{fmt_num(slope, 3)} ± {fmt_num(se, 3)} MiB/min "
                                          f"({len(last_fraction(xs, ys)[0])} samples)"],
        ["agent CPU at this load", f"{100 * cpu / max(t_end - t_start, 1e-9):.1f} % of one core"],
        ["agent CPU per span exported", f"{cpu / exported * 1e6:.0f} µs ({exported:,} spans after the warm-up, "
                                        "fixed costs included)" if exported > 0 else "- (no spans)"],
        ["spans received; events seen, lost; spans dropped",
         f"{receiver.span_count:,}; {status.get('events_seen')}, {status.get('events_lost')}; "
         f"{status.get('spans_dropped')}"],
        ["caches (/healthz), after the warm-up → at the end",
         caches_text(status0.get("caches", {}), status.get("caches", {}))],
        ["agent alive to the end; exit code after SIGTERM", f"{alive}; {rc}"],
    ]
    table.checks += [
        Check("agent RSS growth after the warm-up", f"{growth:+.1f} %", f"≤ {GROWTH_LIMIT_PCT:g} %",
              None if isnan(growth) else growth <= GROWTH_LIMIT_PCT),
        Check("agent RSS levelled off (slope over the last third)", f"{fmt_num(slope, 3)} ± {fmt_num(se, 3)} MiB/min",
              f"slope within ±{flat:g} MiB/min", flat_ok, "too noisy to tell"),
        Check("no span records lost", f"{status.get('events_lost')} lost, {status.get('spans_dropped')} dropped",
              "0", status.get("events_lost", 1) == 0 and status.get("spans_dropped", 1) == 0 if status else False),
        Check("agent up to the end, exit 0 on SIGTERM", f"alive {alive}, exit {rc}", "yes", alive and rc == 0),
    ]
    table.notes.append(f"RSS sampled every {SAMPLE_S:g} s after a warm-up of {min(60.0, minutes * 60 / 4):.0f} s; "
                       "flat: see bench/soak.py's docstring for the threshold")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--flat-mib-per-min", type=float, default=0.1,
                        help="the RSS slope (MiB/min, last third of the soak) under which RSS counts as levelled off")
    parser.add_argument("--output", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root (eBPF probes, servers run as their own users)", file=sys.stderr)
        return 1
    install_cleanup()
    try:
        table = soak(args.minutes, args.flat_mib_per_min,
                     log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all()
    text = table.render()
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    return 1 if any(c.ok is False for c in table.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
