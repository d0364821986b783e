"""Benchmark 1: nginx saturation requests/s with no probes, bpftrace on the agent's probe
points (the floor any eBPF tool pays for them), and the agent.

The probe points come from the agent itself: `NginxTarget().plan(path, config).attach`
(file offsets and labels), mapped back to symbol names through `elf_info(path)` for
bpftrace, whose actions only count hits (the minimum that still shows it attached).
The agent runs as `otel-ebpf run --targets nginx`, exporting OTLP/gRPC to a receiver
in this process, sampling off, three ways (common.AGENT_VARIANTS): as shipped (with its
default span rate limit), every request a span (`--max-spans-per-second 0`), and spans
off (only the kernel side).

nginx runs one worker, wrk one thread (-t1 -c32, keep-alive, a 3-byte static file),
unpinned: on two cores they, the agent and everything else share both (pinning with
taskset gave slower and no steadier runs here). The cases are interleaved, their order
rotated each repeat.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from .common import (
    AGENT_VARIANTS, Agent, BenchError, Bpftrace, CaseRuns, Check, CountingReceiver, MachineWatch, QuietWait,
    Table, agent_cases, agent_run_note, agent_variant_note, cpu_seconds, floor_checks, fmt_ratio, foreign_tracers,
    noise_note, require_tool, run, run_interleaved, throughput_rows,
)

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


def probe_points(target_cls, path: str) -> list[tuple[str, str, str]]:
    """(bpftrace probe type, symbol, agent label) for every probe point the agent attaches."""
    from otel_ebpf.config import Config
    from otel_ebpf.elf import elf_info

    plan = target_cls().plan(path, Config(targets=("nginx",)))
    info = elf_info(path)
    by_offset: dict[int, list[str]] = {}
    for sym in info.symbols_matching(r"[A-Za-z_][\w.@]*"):
        if sym.file_offset >= 0:
            by_offset.setdefault(sym.file_offset, []).append(sym.name)
    points = []
    for spec in plan.attach:
        names = by_offset.get(spec.offset)
        if not names:
            raise BenchError(f"no symbol at file offset {spec.offset:#x} of {path} ({spec.label})")
        # Aliases at one offset: prefer the one the label names.
        name = next((n for n in names if n in spec.label), names[0])
        points.append(("uretprobe" if spec.retprobe else "uprobe", name, spec.label))
    return points


def bpftrace_script(path: str, points: list[tuple[str, str, str]]) -> str:
    return "".join(f"{kind}:{path}:{sym} {{ @p{i} = count(); }}\n" for i, (kind, sym, _) in enumerate(points))


def bpftrace_durations_script(path: str, points: list[tuple[str, str, str]]) -> str:
    """The least a latency tool does at the same two points: a start time per request
    (keyed by thread: one worker serves one request at a time between the two) and a
    histogram of durations, with a count to check it saw every request."""
    (start_kind, start_sym, _), (end_kind, end_sym, _) = points[0], points[-1]
    return (f"{start_kind}:{path}:{start_sym} {{ @start[tid] = nsecs; }}\n"
            f"{end_kind}:{path}:{end_sym} /@start[tid]/ {{ @hist = hist(nsecs - @start[tid]); "
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


def run_case(case: str, server, path: str, points, duration: float, receiver: CountingReceiver,
             runs: CaseRuns, log=print) -> None:
    bt = agent = None
    tool_pid = None
    try:
        others = QuietWait.wait(log, "nginx")
        if case == "bpftrace":
            bt = Bpftrace(bpftrace_script(path, points), label="nginx").start()
            tool_pid = bt.proc.pid
        elif case == BPFTRACE_DURATIONS:
            bt = Bpftrace(bpftrace_durations_script(path, points), label="nginx").start()
            tool_pid = bt.proc.pid
        elif case.startswith("agent"):
            args, env = AGENT_VARIANTS[case]
            agent = Agent("--targets", "nginx", *args, receiver=receiver, label="nginx-agent", env=env).start()
            tool_pid = agent.pid
            before = agent.health()[1]
        truncate_log(server)
        workers = sorted(server.worker_pids())
        watch = MachineWatch((server.master_pid,)).start()
        cpu0 = sum(cpu_seconds(p) for p in workers)
        tool0 = cpu_seconds(tool_pid) if tool_pid else 0.0
        bench0 = cpu_seconds(os.getpid())
        t0 = time.monotonic()
        result = wrk(server.url(URL_PATH), duration)
        wall = time.monotonic() - t0
        worker_cpu = sum(cpu_seconds(p) for p in workers) - cpu0
        tool_cores = (cpu_seconds(tool_pid) - tool0) / wall if tool_pid else 0.0
        bench_cores = (cpu_seconds(os.getpid()) - bench0) / wall
        other, tracers = watch.stop()
        others += foreign_tracers("nginx")
        if result.errors:
            runs.notes.append(f"wrk: {result.errors}")
        runs.add(result.rps, result.requests, worker_cpu, tool_cores, others, noise_note(other, tracers))
        if bt is not None:
            out = bt.stop()
            if case == BPFTRACE_DURATIONS:
                runs.notes.append(f"bpftrace timed {Bpftrace.scalar(out, 'p0')} requests for {result.requests:,} "
                                  f"(wrk)")
            else:
                counts = [Bpftrace.scalar(out, f"p{i}") for i in range(len(points))]
                runs.notes.append(f"bpftrace hits per probe {counts} for {result.requests:,} requests (wrk)")
        if agent is not None:
            runs.notes.append(agent_run_note(before, agent.wait_drained(), f"{result.requests:,} requests",
                                             bench_cores))
    except BenchError as exc:
        runs.notes.append(f"run failed: {exc}")
    finally:
        if bt is not None:
            bt.stop()
        if agent is not None:
            agent.stop()


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
        points = probe_points(target_cls, path)
    except Exception as exc:  # noqa: BLE001 - the target under construction may refuse this build
        return [unavailable_table(f"NginxTarget.plan({path}) failed: {exc}")]
    table = Table(
        f"nginx: wrk -t1 -c32 -d{duration:g}s {URL_PATH} ({WORKERS} worker), {repeats} interleaved repeats",
        ["case", "req/s per run", "median req/s", "spread", "ratio to no probes", "worker CPU µs/req",
         "tool CPU (cores)"])
    table.notes.append("probe points (from NginxTarget.plan): " +
                       ", ".join(f"{kind} {sym}" for kind, sym, _ in points))
    receiver = CountingReceiver().start()
    try:
        log(f"nginx: starting nginx ({WORKERS} worker); probes: {[p[1] for p in points]}")
        server.start()
        wrk(server.url(URL_PATH), 2)  # warm-up
        CASES = cases()
        runs = run_interleaved(CASES, repeats, lambda case, cr: run_case(
            case, server, path, points, duration, receiver, cr, log), "nginx", "req/s", log)
        ratios = throughput_rows(table, runs, "nginx", "worker CPU per request")
        table.notes.insert(1, agent_variant_note())
        floor_checks(table, ratios, {"agent (defaults)": "nginx ratio with the agent (defaults)",
                                     "agent, every span": "nginx ratio with the agent, every request a span"},
                     "≥ bpftrace floor ratio − 0.01")
        if BPFTRACE_DURATIONS in ratios and "agent, spans off" in ratios:
            table.notes.append(f"{BPFTRACE_DURATIONS}: bpftrace pairing the two probes per request into a "
                               f"histogram, the least a latency tool does there: ratio "
                               f"{fmt_ratio(ratios[BPFTRACE_DURATIONS])}, against "
                               f"{fmt_ratio(ratios['agent, spans off'])} "
                               f"for the agent's kernel side alone (spans off)")
    finally:
        receiver.stop()
        server.stop()
    return [table]
