"""MariaDB prepared statements: executes/s with no probes, bpftrace on the agent's probe
points, and the agent.

A throwaway MariaDB (otel_ebpf.servers.mariadb) with a table of 10,000 rows
(`sbtest`: id, k, c CHAR(120)); the load is CLIENTS client processes
(bench/stmt_client.py: mysql-connector-python with its C extension, one connection
each) executing one prepared `SELECT c FROM sbtest WHERE id = ?` with a random id for
the run's duration: one COM_STMT_EXECUTE per execute and nothing else (the clients use
the connection's statement API: mysql-connector's prepared cursor sends a COM_STMT_RESET
before every execute, which would double the commands). sysbench is not installed here.

Per COM_STMT_EXECUTE the agent's probes are hit three times: dispatch_command's entry and
return, and Prepared_statement::execute_loop's entry. bpftrace attaches to every point of
the agent's plan (`MysqlTarget().plan(path, Config()).attach`, offsets mapped back to
the mangled symbols usdt/mysql.yaml names), timing dispatch_command into a histogram and
counting the rest. The cases are interleaved, their order rotated each repeat.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from .agent import agent_variant_note
from .bpfstats import BpfStats
from .procs import BenchError, spawn, stop
from .readings import cpu_seconds
from .receiver import CountingReceiver
from .report import (
    Table, bpf_note, fmt_num, run_interleaved, throughput_headers, throughput_rows,
)
from .stats import median, ratio
from .throughput import LoadResult, agent_tool, bpftrace_tool, measure, no_tool
from .tools import Bpftrace, ProbePoint, agent_probe_points

CASES = ("no probes", "bpftrace", "agent (defaults)")
CLIENTS = 4
ROWS = 10_000
DATABASE = "bench"
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stmt_client.py")


def bpftrace_script(path: str, points: list[ProbePoint]) -> str:
    """The least a latency tool does at the agent's points: dispatch_command timed by thread
    into a histogram (with a count), Prepared_statement's points and the rest counted."""
    out = []
    for p in points:
        probe = p.bpftrace(path)
        if p.where.startswith("_Z16dispatch_command") and p.kind == "uprobe":
            out.append(f"{probe} {{ @ds[tid] = nsecs; }}")
        elif p.where.startswith("_Z16dispatch_command"):
            out.append(f"{probe} /@ds[tid]/ {{ @us = hist((nsecs - @ds[tid]) / 1000); delete(@ds[tid]); "
                       "@n = count(); }")
        elif "execute" in p.where:
            out.append(f"{probe} {{ @x = count(); }}")
        else:
            out.append(f"{probe} {{ @other = count(); }}")
    return "\n".join(out) + "\n"


def start_server():
    from otel_ebpf.servers.mariadb import MariadbServer

    server = MariadbServer().start()
    try:
        server.sql(f"CREATE DATABASE {DATABASE}; CREATE TABLE {DATABASE}.sbtest (id INT PRIMARY KEY, k INT, "
                   f"c CHAR(120)); INSERT INTO {DATABASE}.sbtest SELECT seq, seq % 1000, REPEAT('x', 100) "
                   f"FROM {DATABASE}.seq_1_to_{ROWS}")
    except Exception:
        server.stop()
        raise
    return server


def stmt_load(server, duration: float, clients: int = CLIENTS, lead: float = 2.0) -> LoadResult:
    """CLIENTS client processes executing for `duration` s, from `lead` s from now (after
    they connected and prepared): executes per second, summed over the clients."""
    start_at = time.time() + lead
    procs = []
    try:
        for i in range(clients):
            cfg = {"host": "127.0.0.1", "port": server.port, "database": DATABASE, "start_at": start_at,
                   "seconds": duration, "rows": ROWS, "seed": i + 1}
            procs.append(spawn([sys.executable, "-I", CLIENT, json.dumps(cfg)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE))
        results = []
        for p in procs:
            out, err = p.communicate(timeout=duration + lead + 60)
            if p.returncode != 0:
                raise BenchError(f"the prepared-statement client failed ({p.returncode}): {err.strip()[-300:]}; "
                                 f"the server's log: {server.log_tail()[-400:]}")
            results.append(json.loads(out))
    finally:
        for p in procs:
            stop(p)
    executes = sum(r["executes"] for r in results)
    rate = sum(r["executes"] / r["seconds"] for r in results)
    late = max(r["seconds"] for r in results) - duration
    notes = [f"a client ran {late:.1f} s past the deadline"] if late > 1.0 else []
    return LoadResult(rate, executes, "executes", notes)


def run_case(case: str, server, path: str, points: list[ProbePoint], duration: float, receiver, runs,
             log=print) -> None:
    def start_tool():
        if case == "bpftrace":
            return bpftrace_tool(bpftrace_script(path, points), "mysql", lambda out, res: (
                f"bpftrace timed {Bpftrace.scalar(out, 'n') or 0:,} commands and counted "
                f"{Bpftrace.scalar(out, 'x') or 0:,} executes for {res.operations:,} executes"))
        if case.startswith("agent"):
            return agent_tool(case, "mysql", receiver, "mysql-agent")
        return no_tool()

    measure(runs, target="mysql", start_tool=start_tool, load=lambda: stmt_load(server, duration),
            server_root=server.pid, server_cpu=lambda: cpu_seconds(server.pid), log=log)


def run_benchmark(repeats: int = 3, duration: float = 10.0, log=print) -> list[Table]:
    if importlib.util.find_spec("mysql") is None or importlib.util.find_spec("mysql.connector") is None:
        t = Table("MariaDB prepared statements", ["case", "result"], [["-", "mysql-connector-python is missing"]])
        return [t]
    from otel_ebpf.targets.mysql import MysqlTarget

    receiver = CountingReceiver().start()
    stats = BpfStats().open()
    server = None
    table = Table(f"MariaDB prepared statements: {CLIENTS} clients executing `SELECT c FROM sbtest WHERE id = ?` "
                  f"(COM_STMT_EXECUTE) for {duration:g} s, {repeats} interleaved repeats",
                  throughput_headers("executes/s", "exec"))
    try:
        log(f"mysql: starting MariaDB ({ROWS:,} rows); BPF stats: {stats.how}")
        server = start_server()
        path = os.path.realpath(server.mariadbd)
        points = agent_probe_points(MysqlTarget, "mysql", path)
        try:
            stmt_load(server, 2)  # warm-up: the buffer pool, the statement cache
        except BenchError as exc:  # once seen on a busy machine: a connection lost right after the start
            log(f"mysql: warm-up failed, once more: {str(exc)[:200]}")
            stmt_load(server, 2)
        runs = run_interleaved(list(CASES), repeats, lambda case, cr: run_case(
            case, server, path, points, duration, receiver, cr, log), "mysql", "executes/s", log)
        ratios = throughput_rows(table, runs, "mysql", "server CPU per execute")
        table.notes.insert(0, agent_variant_note())
        table.notes.insert(1, bpf_note(stats))
        table.notes.insert(2, "probe points (from MysqlTarget.plan): " +
                           ", ".join(f"{p.kind} {p.where} ({p.label})" for p in points))
        a, b = ratios.get("agent (defaults)"), ratios.get("bpftrace")
        bt_ns, ag_ns = median(runs["bpftrace"].bpf_ns), median(runs["agent (defaults)"].bpf_ns)
        table.notes.append(f"the agent (defaults) − bpftrace: {fmt_num(a - b, 3)} of no-probe throughput; BPF time "
                           f"per execute {fmt_num(ag_ns, 0)} ns against {fmt_num(bt_ns, 0)} ns "
                           f"({fmt_num(ratio(ag_ns, bt_ns), 2)}×)")
    finally:
        stats.close()
        receiver.stop()
        if server is not None:
            server.stop()
    return [table]
