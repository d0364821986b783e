"""Benchmark 2: pgbench -S transactions/s with no probes, bpftrace, the agent, dbslower-bpfcc.

A throwaway cluster (otel_ebpf.servers.postgres), `pgbench -i -s 10`, then
`pgbench -S -M simple -n -c 4 -j 2 -T <duration>` once per case and repeat, the
cases interleaved (their order rotated each repeat). Ratios are medians over
the no-probe median. `-n` leaves out pgbench's vacuum before each run (the same
for every case; it would only add noise).

Per run we also read the server's CPU per transaction (the postmaster and its
backends: what the probes cost inside the traced process, less sensitive to the
machine's noise than throughput) and the tool's own CPU.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

from .common import (
    AGENT_VARIANTS, Agent, BenchError, Bpftrace, CaseRuns, CountingReceiver, MachineWatch, QuietWait, Table,
    agent_cases, agent_run_note, agent_variant_note, children_of, collect_lines, cpu_seconds, floor_checks,
    foreign_tracers, noise_note, require_tool, run, run_interleaved, spawn, stop, throughput_rows, tree_cpu_seconds,
)
from otel_ebpf.servers.postgres import PostgresServer


def cases() -> tuple[str, ...]:
    return ("no probes", "bpftrace", *agent_cases(), "dbslower-bpfcc")


# --- the cluster and pgbench ------------------------------------------------------------------

class PgCluster:
    """A throwaway PostgreSQL with pgbench's tables at scale 10."""

    def __init__(self, scale: int = 10):
        self.scale = scale
        self.pgbench_bin = require_tool("pgbench")
        self.server = PostgresServer()

    def start(self) -> "PgCluster":
        self.server.start()
        r = run([self.pgbench_bin, *self.conn_args(), "-i", "-s", str(self.scale), "-q"], timeout=300)
        if r.returncode != 0:
            raise BenchError(f"pgbench -i failed: {r.stderr.strip()[-500:]}")
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def postmaster(self) -> int:
        return self.server.pid

    @property
    def binary(self) -> str:
        return os.path.realpath(self.server.postgres)

    def pids(self) -> list[int]:
        """The cluster's processes right now: the postmaster and its children."""
        return [self.postmaster, *children_of(self.postmaster)]

    def conn_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.server.port), "-U", "postgres", "postgres"]

    def pgbench(self, *args: str, duration: float | None = None, timeout: float = 120.0) -> "PgbenchResult":
        argv = [self.pgbench_bin, "-S", "-M", "simple", "-n", *args]
        if duration is not None:
            argv += ["-T", str(int(duration))]
        argv += self.conn_args()
        t0 = time.monotonic()
        r = run(argv, timeout=timeout)
        wall = time.monotonic() - t0
        if r.returncode != 0:
            raise BenchError(f"pgbench failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        m_tps = re.search(r"tps = ([\d.]+)", r.stdout)
        m_n = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
        if not (m_tps and m_n):
            raise BenchError(f"cannot read pgbench's output: {r.stdout[-500:]}")
        return PgbenchResult(float(m_tps.group(1)), int(m_n.group(1)), wall, r.stdout)


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    wall_s: float
    output: str


# --- cases --------------------------------------------------------------------------------------

def bpftrace_script(binary: str) -> str:
    return (f"usdt:{binary}:postgresql:query__start {{ @start[tid] = nsecs; }}\n"
            f"usdt:{binary}:postgresql:query__done /@start[tid]/ {{\n"
            f"  @us = hist((nsecs - @start[tid]) / 1000); delete(@start[tid]); @n = count();\n}}\n")


class Dbslower:
    """dbslower-bpfcc postgres -p PIDS -m THRESHOLD, its output collected line by line."""

    def __init__(self, pids: list[int], threshold_ms: int):
        self.bin = require_tool("dbslower-bpfcc")
        self.argv = [self.bin, "postgres", "-p", *map(str, pids), "-m", str(threshold_ms)]
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def start(self, timeout: float = 60.0) -> "Dbslower":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its prints go to a pipe
        self.proc = spawn(self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = collect_lines(self.proc, self.lines, "TIME(s)")
        if not ready.wait(timeout) or self.proc.poll() is not None:
            out = "".join(self.lines)
            self.stop()
            raise BenchError(f"dbslower-bpfcc did not start: {out[-800:]}")
        time.sleep(0.3)
        return self

    def stop(self) -> list[str]:
        """The query lines it printed."""
        stop(self.proc, signal.SIGINT, timeout=20.0)
        time.sleep(0.05)
        out, seen_header = [], False
        for line in self.lines:
            if line.startswith("TIME(s)"):
                seen_header = True
            elif seen_header and re.match(r"\s*\d+\.\d+\s+\d+\s", line):
                out.append(line)
        return out


def run_case(case: str, cluster: PgCluster, duration: float, receiver: CountingReceiver, runs: CaseRuns,
             log=print) -> None:
    tool_pid = None
    agent = bt = dbs = None
    try:
        others = QuietWait.wait(log, "postgres")
        if case == "bpftrace":
            bt = Bpftrace(bpftrace_script(cluster.binary), label="pg").start()
            tool_pid = bt.proc.pid
        elif case.startswith("agent"):
            args, env = AGENT_VARIANTS[case]
            agent = Agent("--targets", "postgres", *args, receiver=receiver, label="pg-agent", env=env).start()
            tool_pid = agent.pid
            before = agent.health()[1]
        elif case == "dbslower-bpfcc":
            dbs = Dbslower(cluster.pids(), threshold_ms=1000).start()
            tool_pid = dbs.proc.pid
        watch = MachineWatch((cluster.postmaster,)).start()
        server0 = tree_cpu_seconds(cluster.postmaster)
        tool0 = cpu_seconds(tool_pid) if tool_pid else 0.0
        bench0 = cpu_seconds(os.getpid())
        t0 = time.monotonic()
        result = cluster.pgbench("-c", "4", "-j", "2", duration=duration)
        time.sleep(0.3)  # the postmaster reaps the backends: their CPU lands in its cutime
        wall = time.monotonic() - t0
        server_cpu = tree_cpu_seconds(cluster.postmaster) - server0
        tool_cores = ((cpu_seconds(tool_pid) - tool0) / wall) if tool_pid else 0.0
        bench_cores = (cpu_seconds(os.getpid()) - bench0) / wall
        other, tracers = watch.stop()
        others += foreign_tracers("postgres")
        runs.add(result.tps, result.transactions, server_cpu, tool_cores, others, noise_note(other, tracers))
        if bt is not None:
            out = bt.stop()
            seen = Bpftrace.scalar(out, "n")
            runs.notes.append(f"bpftrace counted {seen if seen is not None else '?'} of "
                              f"{result.transactions:,} transactions")
        if agent is not None:
            runs.notes.append(agent_run_note(before, agent.wait_drained(), f"{result.transactions:,} transactions",
                                             bench_cores))
        if dbs is not None:
            lines = dbs.stop()
            runs.notes.append(f"dbslower reported {len(lines)} queries (-m 1000)")
    except BenchError as exc:
        runs.notes.append(f"run failed: {explain(str(exc))}")
    finally:
        if bt is not None:
            bt.stop()
        if agent is not None:
            agent.stop()
        if dbs is not None:
            dbs.stop()


def explain(error: str) -> str:
    """dbslower's "cannot attach uprobe, Invalid argument": say why when the kernel logged it."""
    first = error.splitlines()[0] if error else error
    if "Invalid argument" not in error:
        return first
    r = run(["dmesg"], timeout=10)
    if "ref_ctr_offset mismatch" in (r.stdout or "")[-4000:]:
        return (first + " (dmesg: 'ref_ctr_offset mismatch': another tool, such as an otel-ebpf agent, holds a "
                "system-wide uprobe with the kernel-managed semaphore on the same USDT probe, and the kernel "
                "refuses bcc's per-PID attach without one)")
    return first


def dbslower_coverage(cluster: PgCluster) -> str:
    """dbslower -m 0 (every query): queries on a backend that existed when it started vs
    queries on backends forked after it started (pgbench's)."""
    import psycopg2

    conn = psycopg2.connect(cluster.server.dsn())
    conn.autocommit = True
    dbs = None
    try:
        dbs = Dbslower(cluster.pids(), threshold_ms=0).start()
        existing = 100
        with conn.cursor() as cur:
            for i in range(existing):
                cur.execute(f"SELECT {i} /* bench-existing-backend */")
        result = cluster.pgbench("-c", "4", "-j", "2", "-t", "250")
        time.sleep(1.0)
        lines = dbs.stop()
        dbs = None
        seen_existing = sum("bench-existing-backend" in line for line in lines)
        seen_new = sum("pgbench_accounts" in line for line in lines)
        return (f"dbslower-bpfcc -m 0 (prints every query it sees): {seen_existing}/{existing} queries of a "
                f"backend running before it started, {seen_new}/{result.transactions} queries of pgbench's "
                "backends forked after it started. It attaches per PID (USDT(pid=...)), so new backends are "
                "not traced: its throughput row measures a tool that sees none of pgbench's queries.")
    finally:
        if dbs is not None:
            dbs.stop()
        conn.close()


# --- the benchmark ---------------------------------------------------------------------------------

def run_benchmark(repeats: int = 3, duration: float = 10.0, log=print) -> list[Table]:
    table = Table(
        f"PostgreSQL: pgbench -S -M simple -n -c 4 -j 2 -T {duration:g} (scale 10), {repeats} interleaved repeats",
        ["case", "tps per run", "median tps", "spread", "ratio to no probes", "server CPU µs/txn", "tool CPU (cores)"])
    cluster = PgCluster()
    receiver = CountingReceiver().start()
    try:
        log(f"pg: starting a cluster and pgbench -i -s {cluster.scale}")
        cluster.start()
        cluster.pgbench("-c", "4", "-j", "2", duration=2)  # warm-up: caches, connections
        CASES = cases()
        runs = run_interleaved(CASES, repeats, lambda case, cr: run_case(
            case, cluster, duration, receiver, cr, log), "pg", "tps", log)
        ratios = throughput_rows(table, runs, "postgres", "server CPU per transaction")
        try:
            table.notes.append(dbslower_coverage(cluster))
        except (BenchError, OSError) as exc:
            table.notes.append(f"dbslower coverage check failed: {explain(str(exc))}")
        table.notes.insert(0, agent_variant_note())
        floor_checks(table, ratios, {"agent (defaults)": "pgbench -S ratio with the agent (defaults)",
                                     "agent, every span": "pgbench -S ratio with the agent, every query a span"},
                     "≥ bpftrace ratio − 0.01")
    finally:
        receiver.stop()
        cluster.stop()
    return [table]
