"""PostgreSQL: pgbench -S transactions/s per protocol with no probes, bpftrace on the
agent's probe points, the agent, dbslower-bpfcc.

A throwaway cluster (otel_ebpf.servers.postgres), `pgbench -i -s 10`, then
`pgbench -S -M <protocol> -n -c 4 -j 2 -T <duration>` once per case and repeat, for the
simple, extended and prepared protocols. Every (protocol, case) pair is interleaved
with every other (the order rotated each repeat): drift hits all alike. Ratios are
medians over the same protocol's no-probe median. `-n` leaves out pgbench's vacuum before
each run (the same for every case; it would only add noise).

The agent's probe points come from its own plan (`PostgresTarget().plan(path, Config())`):
query__start/done (simple protocol), query__execute__start/done at PortalRun's sites
(one Execute of the extended protocol; also inside every simple query), transaction__abort
and errcode() (failures only). bpftrace attaches the same USDT probes by name, which
also takes in PortalRunMulti's query__execute sites: bpftrace 0.17 as Debian builds it
refuses `uprobe:PATH:PortalRun+OFFSET` and addresses ("compiled without (k|u)probe offset
support"). PortalRunMulti runs only for non-SELECT portals, so under pgbench -S its sites
are not hit: the "BPF runs/txn" column shows the same hits per transaction for both tools.

Per run also: the server's CPU per transaction (the postmaster and its backends), the
tool's own CPU, the run time of its BPF programs per transaction (bpfstats) and, for the
agent, its CPU per span it exported.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from otel_ebpf.servers.postgres import PostgresServer

from .agent import agent_cases, agent_variant_note
from .bpfstats import BpfStats
from .procs import BenchError, require_tool, run
from .readings import children_of, tree_cpu_seconds
from .receiver import CountingReceiver
from .report import (
    Check, Table, bpf_note, bpf_time_check, floor_checks, fmt_num, fmt_rate, fmt_ratio, run_interleaved, throughput_headers,
    throughput_rows,
)
from .stats import median, ratio, within
from .throughput import LoadResult, ToolRun, agent_tool, bpftrace_tool, measure, no_tool
from .tools import Bpftrace, Dbslower, ProbePoint, agent_probe_points

PROTOCOLS = ("simple", "extended", "prepared")
# The agent's probe hits per statement (see the module's docstring).
HITS = {"simple": "4: query__start/done + PortalRun's query__execute__start/done",
        "extended": "2: PortalRun's query__execute__start/done per Execute",
        "prepared": "2: PortalRun's query__execute__start/done per Execute"}
MARGIN = 0.02  # the agent's ratio at most this far under bpftrace's on the same points
BPF_FACTOR = 1.5  # the agent's BPF time per transaction at most this many times bpftrace's


def cases(protocol: str) -> tuple[str, ...]:
    if protocol == "simple":
        return ("no probes", "bpftrace", *agent_cases(), "dbslower-bpfcc")
    return ("no probes", "bpftrace", "agent (defaults)")


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

    def pgbench(self, *args: str, duration: float | None = None, protocol: str = "simple",
                timeout: float = 120.0) -> "PgbenchResult":
        argv = [self.pgbench_bin, "-S", "-M", protocol, "-n", *args]
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

def bpftrace_script(binary: str, points: list[ProbePoint]) -> str:
    """At the agent's points, the least a latency tool does there: a start time per backend
    (tid) at each start probe, a histogram of durations and a count at each done probe, a
    count at the failure probes."""
    out = []
    for p in points:
        probe = p.bpftrace(binary)
        if p.where.endswith("query__start"):
            out.append(f"{probe} {{ @qs[tid] = nsecs; }}")
        elif p.where.endswith("query__done"):
            out.append(f"{probe} /@qs[tid]/ {{ @query_us = hist((nsecs - @qs[tid]) / 1000); delete(@qs[tid]); "
                       "@n = count(); }")
        elif p.where.endswith("query__execute__start"):
            out.append(f"{probe} {{ @es[tid] = nsecs; }}")
        elif p.where.endswith("query__execute__done"):
            out.append(f"{probe} /@es[tid]/ {{ @execute_us = hist((nsecs - @es[tid]) / 1000); delete(@es[tid]); "
                       "@x = count(); }")
        else:
            out.append(f"{probe} {{ @other = count(); }}")
    return "\n".join(out) + "\n"


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


def dbslower_tool(cluster: PgCluster) -> ToolRun:
    dbs = Dbslower(cluster.pids(), threshold_ms=1000).start()
    return ToolRun(dbs.pid, finish=lambda result: [f"dbslower reported {len(dbs.stop())} queries (-m 1000)"],
                   close=dbs.stop)


def run_case(key: tuple[str, str], cluster: PgCluster, binary_points: list[ProbePoint], duration: float,
             receiver: CountingReceiver, runs, log=print) -> None:
    protocol, case = key

    def start_tool() -> ToolRun:
        if case == "bpftrace":
            return bpftrace_tool(bpftrace_script(cluster.binary, binary_points), "pg", lambda out, res: (
                f"bpftrace paired {Bpftrace.scalar(out, 'n') or 0:,} queries and "
                f"{Bpftrace.scalar(out, 'x') or 0:,} executes for {res.operations:,} transactions"))
        if case.startswith("agent"):
            return agent_tool(case, "postgres", receiver, "pg-agent")
        if case == "dbslower-bpfcc":
            return dbslower_tool(cluster)
        return no_tool()

    def load() -> LoadResult:
        result = cluster.pgbench("-c", "4", "-j", "2", duration=duration, protocol=protocol)
        return LoadResult(result.tps, result.transactions, "transactions")

    measure(runs, target="postgres", start_tool=start_tool, load=load, server_root=cluster.postmaster,
            server_cpu=lambda: tree_cpu_seconds(cluster.postmaster), settle=0.3, log=log, explain=explain)


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

def protocol_summary(runs_by_protocol: dict[str, dict], ratios: dict[str, dict], stats: BpfStats) -> Table:
    """The protocols side by side: bpftrace and the agent (defaults), ratios and BPF time."""
    table = Table("PostgreSQL by protocol: pgbench -S, the agent (defaults) against bpftrace on the same probe points",
                  ["protocol", "agent's probe hits per statement", "no probes tps", "bpftrace ratio", "agent ratio",
                   "agent − bpftrace", "BPF ns/txn bpftrace", "BPF ns/txn agent", "agent ÷ bpftrace BPF",
                   "agent CPU µs/kept span"])
    for protocol, runs in runs_by_protocol.items():
        r = ratios[protocol]
        bt, ag = runs.get("bpftrace"), runs.get("agent (defaults)")
        bt_ns = median(bt.bpf_ns) if bt else float("nan")
        ag_ns = median(ag.bpf_ns) if ag else float("nan")
        b, a = r.get("bpftrace", float("nan")), r.get("agent (defaults)", float("nan"))
        table.rows.append([f"-M {protocol}", HITS[protocol], fmt_rate(median(runs["no probes"].rates)),
                           fmt_ratio(b), fmt_ratio(a), fmt_num(a - b, 3), fmt_num(bt_ns, 0), fmt_num(ag_ns, 0),
                           fmt_num(ratio(ag_ns, bt_ns), 2), fmt_num(median(ag.us_per_span)) if ag else "-"])
        table.checks.append(Check(f"pgbench -S -M {protocol}: the agent (defaults) against bpftrace on the same points",
                                  f"{fmt_ratio(a)} (bpftrace {fmt_ratio(b)})", f"ratio ≥ bpftrace's − {MARGIN}",
                                  within(a, b, MARGIN)))
        if stats.enabled:
            table.checks.append(bpf_time_check(f"PostgreSQL -M {protocol}: the agent's BPF time per transaction",
                                               ag_ns, bt_ns, "bpftrace", BPF_FACTOR))
    table.notes.append("ratios: the protocol's median tps over the same protocol's no-probe median; BPF ns/txn: "
                       "the run time of the tool's BPF programs per pgbench transaction (one SELECT each)")
    return table


def run_benchmark(repeats: int = 3, duration: float = 10.0, log=print, protocols=PROTOCOLS) -> list[Table]:
    cluster = PgCluster()
    receiver = CountingReceiver().start()
    stats = BpfStats().open()
    tables: list[Table] = []
    try:
        log(f"pg: starting a cluster and pgbench -i -s {cluster.scale}; BPF stats: {stats.how}")
        cluster.start()
        from otel_ebpf.targets.postgres import PostgresTarget

        points = agent_probe_points(PostgresTarget, "postgres", cluster.binary)
        for protocol in protocols:  # warm-up: caches, connections, each protocol's plans
            cluster.pgbench("-c", "4", "-j", "2", duration=2, protocol=protocol)
        keys = [(p, c) for p in protocols for c in cases(p)]
        runs = run_interleaved(keys, repeats, lambda key, cr: run_case(
            key, cluster, points, duration, receiver, cr, log), "pg", "tps", log)
        runs_by_protocol = {p: {c: runs[(p, c)] for c in cases(p)} for p in protocols}
        ratios = {}
        for protocol in protocols:
            table = Table(f"PostgreSQL: pgbench -S -M {protocol} -n -c 4 -j 2 -T {duration:g} (scale 10), "
                          f"{repeats} interleaved repeats", throughput_headers("tps", "txn"))
            ratios[protocol] = throughput_rows(table, runs_by_protocol[protocol], "postgres",
                                               "server CPU per transaction")
            if protocol == "simple":
                table.notes.insert(0, agent_variant_note())
                table.notes.insert(1, bpf_note(stats))
                table.notes.insert(2, "probe points (from PostgresTarget.plan; bpftrace attaches the same by name): "
                                   + ", ".join(f"{p.kind} {p.where}" for p in points))
                try:
                    table.notes.append(dbslower_coverage(cluster))
                except (BenchError, OSError) as exc:
                    table.notes.append(f"dbslower coverage check failed: {explain(str(exc))}")
                floor_checks(table, ratios[protocol],
                             {"agent (defaults)": "pgbench -S ratio with the agent (defaults)",
                              "agent, every span": "pgbench -S ratio with the agent, every query a span"},
                             "≥ bpftrace ratio − 0.01")
            tables.append(table)
        tables.append(protocol_summary(runs_by_protocol, ratios, stats))
    finally:
        stats.close()
        receiver.stop()
        cluster.stop()
    return tables
