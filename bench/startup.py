"""Benchmark 4: seconds from `otel-ebpf run` starting to /healthz answering 200.

Two ways to run it: `--targets postgres` (one binary, one program) and every target
of this build (what a plain `otel-ebpf run` does: every binary of every target found
on this host is compiled for and attached). Each is started three times, interleaved;
the median counts. The agent's log tells where the time went (one line per attached
binary, with a timestamp).
"""
from __future__ import annotations

import re
from datetime import datetime

from .common import Agent, BenchError, Check, CountingReceiver, Table, median

VARIANTS = (("--targets postgres", ("--targets", "postgres")), ("all targets (default)", ()))
_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (\w+): attached (\d+) probes to (\S+)")


def attach_times(log_text: str, start: datetime | None) -> list[str]:
    """'target path: +N.NN s' for each attach line of the agent's log."""
    out = []
    first = None
    for line in log_text.splitlines():
        m = _LINE_RE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        first = first or start or t
        out.append(f"{m.group(2)} {m.group(4)} ({m.group(3)} probes) at +{(t - first).total_seconds():.2f} s")
    return out


def run_benchmark(repeats: int = 3, log=print) -> list[Table]:
    table = Table(f"Start-up: seconds from process start to /healthz 200 ({repeats} starts each, interleaved)",
                  ["agent", "seconds per start", "median s", "/healthz", "probes attached", "RSS after start MB"])
    receiver = CountingReceiver().start()
    times: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    info: dict[str, tuple[int, float]] = {}
    failures: dict[str, str] = {}
    degraded: dict[str, list[str]] = {name: [] for name, _ in VARIANTS}  # per start: "" or what failed
    try:
        for r in range(repeats):
            for name, args in VARIANTS:
                start = datetime.now()
                agent = Agent(*args, receiver=receiver, label="startup")
                try:
                    agent.start(timeout=60, accept_degraded=True)
                    times[name].append(agent.settled_after)
                    degraded[name].append(agent.degraded)
                    status = agent.health()[1]
                    info[name] = (status.get("probes_attached", 0), agent.rss_mb())
                    if r == repeats - 1:
                        table.notes.append(f"{name}: " + "; ".join(attach_times(agent.log_tail(100_000), start)))
                    log(f"startup: {name}: {agent.settled_after:.2f} s{' (degraded)' if agent.degraded else ''}")
                except BenchError as exc:
                    failures[name] = str(exc)
                    log(f"startup: {name}: {exc}")
                finally:
                    agent.stop()
    finally:
        receiver.stop()
    for name, _ in VARIANTS:
        ts = times[name]
        probes, rss = info.get(name, (0, float("nan")))
        bad = [d for d in degraded[name] if d]
        health = "-" if not ts else ", ".join(
            f"{label} ×{n}" for label, n in (("200 ok", len(ts) - len(bad)), ("503 degraded", len(bad))) if n)
        table.rows.append([name, " / ".join(f"{t:.2f}" for t in ts) or "-", f"{median(ts):.2f}" if ts else "-",
                           health, str(probes) if ts else "-", f"{rss:.0f}" if ts else "-"])
        if name in failures:
            table.notes.append(f"{name}: failed: {failures[name]}")
        for d in dict.fromkeys(bad):
            table.notes.append(f"{name}: degraded (503, the time shown is until then): {d}")
        measured = (f"{median(ts):.2f} s" + (f", {len(bad)} of {len(ts)} starts degraded (503)" if bad else "")
                    if ts else "never")
        table.checks.append(Check(f"healthy after start, {name}", measured, "≤ 5 s",
                                  (median(ts) <= 5.0 and not bad) if ts else False))
    return [table]
