"""One run of a throughput case, the same for nginx, PostgreSQL and MariaDB: start the
tool of the case (nothing, bpftrace, the agent, ...), take readings before and after the
load (the server's CPU, the tool's CPU, its BPF programs' run time, the agent's counters),
stop the tool, and add it all to the case's CaseRuns."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from . import bpfstats
from .agent import AGENT_VARIANTS, BenchAgent, agent_run_note
from .machine import MachineWatch, QuietWait, foreign_tracers, noise_note
from .procs import BenchError
from .readings import cpu_seconds
from .report import CaseRuns
from .tools import Bpftrace


@dataclass
class LoadResult:
    rate: float  # operations per second, as the load generator measured them
    operations: int
    what: str  # e.g. "requests", "transactions", "executes"
    notes: list[str] = field(default_factory=list)


@dataclass
class ToolRun:
    """What runs beside the server in one case: its process, how to end it and what it says."""

    pid: int | None = None
    agent: BenchAgent | None = None
    finish: Callable[[LoadResult], list[str]] = lambda result: []  # after the load: notes
    close: Callable[[], object] = lambda: None  # always, also after a failure


def no_tool() -> ToolRun:
    return ToolRun()


def bpftrace_tool(script: str, label: str, summarize: Callable[[str, LoadResult], str]) -> ToolRun:
    """bpftrace running `script`; `summarize(output, result)` makes its note."""
    bt = Bpftrace(script, label=label).start()
    return ToolRun(bt.pid, finish=lambda result: [summarize(bt.stop(), result)], close=bt.stop)


def agent_tool(case: str, target: str, receiver, label: str) -> ToolRun:
    args, env = AGENT_VARIANTS[case]
    agent = BenchAgent("--targets", target, *args, receiver=receiver, label=label, env=env).start()
    return ToolRun(agent.pid, agent=agent, close=agent.stop)


def measure(runs: CaseRuns, *, target: str, start_tool: Callable[[], ToolRun], load: Callable[[], LoadResult],
            server_root: int, server_cpu: Callable[[], float], settle: float = 0.0, log=print,
            explain: Callable[[str], str] = lambda error: error.splitlines()[0] if error else error) -> None:
    """One run of a case: see the module's docstring. A failure becomes a note of the case."""
    tool: ToolRun | None = None
    try:
        others = QuietWait.wait(log, target)
        tool = start_tool()
        before = tool.agent.health()[1] if tool.agent else {}
        watch = MachineWatch((server_root,)).start()
        server0 = server_cpu()
        tool0 = cpu_seconds(tool.pid) if tool.pid else 0.0
        progs0 = bpfstats.programs_of(tool.pid) if tool.pid else {}
        bench0 = cpu_seconds(os.getpid())
        t0 = time.monotonic()
        result = load()
        progs1 = bpfstats.programs_of(tool.pid) if tool.pid else {}
        time.sleep(settle)  # e.g. the postmaster reaps the backends: their CPU lands in its cutime
        wall = time.monotonic() - t0
        server = server_cpu() - server0
        tool_cores = (cpu_seconds(tool.pid) - tool0) / wall if tool.pid else 0.0
        bench_cores = (cpu_seconds(os.getpid()) - bench0) / wall
        other, tracers = watch.stop()
        others += foreign_tracers(target)
        runs.add(result.rate, result.operations, server, tool_cores, others, noise_note(other, tracers))
        runs.notes += result.notes
        if tool.pid:
            progs = bpfstats.usage(progs0, progs1)
            if progs:
                ns, per_op = bpfstats.per_operation(progs, result.operations)
                runs.add_bpf(ns, per_op, bpfstats.describe(progs, result.operations))
        if tool.agent is not None:
            after = tool.agent.wait_drained()
            exported = after.get("spans_exported", 0) - before.get("spans_exported", 0)
            if exported > 0:  # the agent's CPU from the load's start until its queue was drained
                runs.us_per_span.append((cpu_seconds(tool.pid) - tool0) / exported * 1e6)
            runs.notes.append(agent_run_note(before, after, f"{result.operations:,} {result.what}", bench_cores))
        runs.notes += tool.finish(result)
    except BenchError as exc:
        runs.notes.append(f"run failed: {explain(str(exc))}")
    finally:
        if tool is not None:
            tool.close()
