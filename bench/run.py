"""otel-ebpf benchmark suite: `make bench` (= .venv/bin/python bench/run.py), as root.

Runs the benchmarks one after the other and prints their tables (Markdown), then every
target with PASS/MISS. Progress goes to stderr, tables to stdout (and to --output FILE).
Each benchmark stops everything it started (servers, bpftrace, agents), also on Ctrl-C
or failure. bench/README.md says what each table measures.

    bench/run.py                          # all: nginx, pg, mysql, capacity, startup (~17 minutes)
    bench/run.py --only pg,startup        # a subset
    bench/run.py --repeats 5 --duration 6 # more, shorter interleaved repeats
    bench/run.py --only pg --repeats 1 --duration 3   # a quick look (noisy)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import capacity, mariadb_stmt, nginx, pg, startup  # noqa: E402
from bench.machine import QuietWait  # noqa: E402
from bench.procs import BenchError, install_cleanup, stop_all  # noqa: E402
from bench.report import Table, checks_table  # noqa: E402

BENCHMARKS = ("nginx", "pg", "mysql", "capacity", "startup")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_line() -> str:
    cpus = os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}: Linux {platform.release()}, {cpus} CPUs ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="otel-ebpf benchmarks (ratios measured side by side)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per case (nginx, pg, mysql)")
    parser.add_argument("--starts", type=int, default=5, help="cold and warm starts each (startup)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk/pgbench run")
    parser.add_argument("--output", help="also write the tables (Markdown) to this file")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="seconds (in all) to wait for other eBPF tools on this machine to finish before "
                             "measuring (their probes would skew the no-probe baselines)")
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    if os.geteuid() != 0:
        print("bench: run as root (eBPF probes, servers run as their own users)", file=sys.stderr)
        return 1
    install_cleanup()
    QuietWait.budget_s = args.quiet_wait
    out = open(args.output, "w") if args.output else None

    def emit(text: str) -> None:
        print(text, flush=True)
        if out is not None:
            out.write(text + "\n")
            out.flush()

    t_start = time.monotonic()
    emit(f"## otel-ebpf benchmarks, {time.strftime('%Y-%m-%d %H:%M')}\n\n{machine_line()}\n")
    tables: list[Table] = []
    failed = False
    try:
        for name in chosen:
            t0 = time.monotonic()
            log(f"{name}: start")
            try:
                if name == "nginx":
                    result = nginx.run_benchmark(args.repeats, args.duration, log)
                elif name == "pg":
                    result = pg.run_benchmark(args.repeats, args.duration, log)
                elif name == "mysql":
                    result = mariadb_stmt.run_benchmark(args.repeats, args.duration, log)
                elif name == "capacity":
                    result = capacity.run_benchmark(args.duration, log)
                else:
                    result = startup.run_benchmark(args.starts, log)
            except (BenchError, OSError) as exc:
                failed = True
                log(f"{name}: failed: {exc}")
                traceback.print_exc(file=sys.stderr)
                result = [Table(f"{name}: failed", ["error"], [[str(exc)]])]
            for table in result:
                emit(table.render())
            tables += result
            log(f"{name}: done in {time.monotonic() - t0:.0f} s")
    except KeyboardInterrupt:
        log("interrupted: stopping what was started")
        stop_all()
        return 130
    finally:
        stop_all()
    checks = [c for t in tables for c in t.checks]
    if checks:
        emit(checks_table(checks, "Targets") + "\n")
    emit(f"(suite ran in {time.monotonic() - t_start:.0f} s)")
    if out is not None:
        out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
