"""nginx saturation requests/s with no probes, bpftrace on the agent's probe points, and the agent.

The probe points come from the agent itself: `NginxTarget().plan(path, config).attach`
(file offsets and labels), mapped back to symbol names through `elf_info(path)` for
bpftrace. Two bpftrace cases: counting hits only (the floor any eBPF tool pays for
those points), and timing each request between the two points into a histogram (the
least a latency tool does there). The agent runs as `otel-ebpf run --targets nginx`,
exporting OTLP/gRPC to a receiver in this process, three ways (agent.AGENT_VARIANTS).

With BPF statistics on (bpfstats), each run also reads the run time of the tool's own
BPF programs: nanoseconds per request inside nginx's worker, the agent's against
bpftrace's at the same points.

nginx runs one worker, wrk one thread (-t1 -c32, keep-alive, a 3-byte static file),
unpinned: on two cores they, the agent and everything else share both (pinning with
taskset gave slower and no steadier runs here). The cases are interleaved, their order
rotated each repeat.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .agent import agent_cases, agent_variant_note
from .bpfstats import BpfStats
from .procs import BenchError, require_tool, run
from .readings import cpu_seconds
from .receiver import CountingReceiver
from .report import (
    Check, Table, bpf_note, bpf_time_check, floor_checks, fmt_num, fmt_ratio, run_interleaved, throughput_headers,
    throughput_rows,
)
from .stats import median
from .throughput import LoadResult, agent_tool, bpftrace_tool, measure, no_tool
from .tools import Bpftrace, ProbePoint, agent_probe_points

WORKERS = 1
URL_PATH = "/static/ok.txt"
UNAVAILABLE = "nginx: target not available in this build"
BPFTRACE_DURATIONS = "bpftrace, durations"


def cases() -> tuple[str, ...]:
    return ("no probes", "bpftrace", BPFTRACE_DURATIONS, *agent_cases())


def load_nginx():
    """(NginxTarget, NginxServer) classes, or None when this build has no nginx target."""
    try:
        from otel_ebpf.servers.nginx import NginxServer
        from otel_ebpf.targets.nginx import NginxTarget
    except ImportError:
        return None
    return NginxTarget, NginxServer


def bpftrace_script(path: str, points: list[ProbePoint]) -> str:
    return "".join(f"{p.bpftrace(path)} {{ @p{i} = count(); }}\n" for i, p in enumerate(points))


def bpftrace_durations_script(path: str, points: list[ProbePoint]) -> str:
    """The least a latency tool does at the same two points: a start time per request
    (keyed by thread: one worker serves one request at a time between the two) and a
    histogram of durations, with a count to check it saw every request."""
    start, end = points[0], points[-1]
    return (f"{start.bpftrace(path)} {{ @start[tid] = nsecs; }}\n"
            f"{end.bpftrace(path)} /@start[tid]/ {{ @hist = hist(nsecs - @start[tid]); "
            f"delete(@start[tid]); @p0 = count(); }}\n")


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: str


def wrk(url: str, duration: float, connections: int = 32) -> WrkResult:
    r = run([require_tool("wrk"), "-t1", f"-c{connections}", f"-d{int(duration)}s", url], timeout=duration + 60)
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    m_n = re.search(r"(\d+) requests in", r.stdout)
    if r.returncode != 0 or not (m_rps and m_n):
        raise BenchError(f"wrk failed ({r.returncode}): {(r.stdout + r.stderr)[-500:]}")
    errors = "; ".join(line.strip() for line in r.stdout.splitlines()
                       if line.strip().startswith(("Non-2xx", "Socket errors")))
    return WrkResult(float(m_rps.group(1)), int(m_n.group(1)), errors)


def truncate_log(server) -> None:
    # The access log grows by ~25k lines/s; nginx appends (O_APPEND), so truncating is safe.
    try:
        os.truncate(server.access_log, 0)
    except OSError:
        pass


def run_case(case: str, server, path: str, points: list[ProbePoint], duration: float,
             receiver: CountingReceiver, runs, log=print) -> None:
    def start_tool():
        if case == "bpftrace":
            return bpftrace_tool(bpftrace_script(path, points), "nginx", lambda out, res: (
                f"bpftrace hits per probe {[Bpftrace.scalar(out, f'p{i}') for i in range(len(points))]} "
                f"for {res.operations:,} requests (wrk)"))
        if case == BPFTRACE_DURATIONS:
            return bpftrace_tool(bpftrace_durations_script(path, points), "nginx", lambda out, res: (
                f"bpftrace timed {Bpftrace.scalar(out, 'p0')} requests for {res.operations:,} (wrk)"))
        if case.startswith("agent"):
            return agent_tool(case, "nginx", receiver, "nginx-agent")
        return no_tool()

    workers: list[int] = []

    def server_cpu() -> float:
        return sum(cpu_seconds(p) for p in workers)

    def load() -> LoadResult:
        result = wrk(server.url(URL_PATH), duration)
        return LoadResult(result.rps, result.requests, "requests", [f"wrk: {result.errors}"] if result.errors else [])

    truncate_log(server)
    workers[:] = sorted(server.worker_pids())
    measure(runs, target="nginx", start_tool=start_tool, load=load, server_root=server.master_pid,
            server_cpu=server_cpu, log=log)


def unavailable_table(why: str) -> Table:
    t = Table("nginx: wrk saturation requests/s", ["case", "result"])
    t.rows.append([UNAVAILABLE, why])
    t.checks.append(Check("nginx ratio with the agent", UNAVAILABLE, "≥ bpftrace floor ratio − 0.01", None))
    return t


def run_benchmark(repeats: int = 3, duration: float = 10.0, log=print) -> list[Table]:
    classes = load_nginx()
    if classes is None:
        return [unavailable_table("otel_ebpf.targets.nginx or otel_ebpf.servers.nginx is missing")]
    target_cls, server_cls = classes
    server = server_cls(workers=WORKERS)
    path = os.path.realpath(server.nginx)
    try:
        points = agent_probe_points(target_cls, "nginx", path)
    except Exception as exc:  # noqa: BLE001 - the target under construction may refuse this build
        return [unavailable_table(f"NginxTarget.plan({path}) failed: {exc}")]
    table = Table(f"nginx: wrk -t1 -c32 -d{duration:g}s {URL_PATH} ({WORKERS} worker), {repeats} interleaved repeats",
                  throughput_headers("req/s", "req"))
    table.notes.append("probe points (from NginxTarget.plan): " + ", ".join(f"{p.kind} {p.where}" for p in points))
    receiver = CountingReceiver().start()
    stats = BpfStats().open()
    try:
        log(f"nginx: starting nginx ({WORKERS} worker); probes: {[p.where for p in points]}; BPF stats: {stats.how}")
        server.start()
        wrk(server.url(URL_PATH), 2)  # warm-up
        runs = run_interleaved(list(cases()), repeats, lambda case, cr: run_case(
            case, server, path, points, duration, receiver, cr, log), "nginx", "req/s", log)
        ratios = throughput_rows(table, runs, "nginx", "worker CPU per request")
        table.notes.insert(1, agent_variant_note())
        table.notes.insert(2, bpf_note(stats))
        floor_checks(table, ratios, {"agent (defaults)": "nginx ratio with the agent (defaults)",
                                     "agent, every span": "nginx ratio with the agent, every request a span"},
                     "≥ bpftrace floor ratio − 0.01")
        if BPFTRACE_DURATIONS in ratios and "agent, spans off" in ratios:
            table.notes.append(f"{BPFTRACE_DURATIONS}: bpftrace pairing the two probes per request into a "
                               f"histogram, the least a latency tool does there: ratio "
                               f"{fmt_ratio(ratios[BPFTRACE_DURATIONS])}, against "
                               f"{fmt_ratio(ratios['agent, spans off'])} for the agent's kernel side alone (spans off)")
        if stats.enabled:
            agent_ns = median(runs["agent (defaults)"].bpf_ns)
            table.checks.append(bpf_time_check(
                "nginx: the agent's BPF time per request (defaults)", agent_ns,
                median(runs[BPFTRACE_DURATIONS].bpf_ns), BPFTRACE_DURATIONS))
            table.notes.append(f"BPF time per request: the agent (defaults) {fmt_num(agent_ns, 0)} ns, bpftrace "
                               f"counting hits {fmt_num(median(runs['bpftrace'].bpf_ns), 0)} ns, bpftrace timing "
                               f"requests {fmt_num(median(runs[BPFTRACE_DURATIONS].bpf_ns), 0)} ns; the check compares "
                               "with the second: a latency tool times requests, counting is no latency tool")
    finally:
        stats.close()
        receiver.stop()
        server.stop()
    return [table]

