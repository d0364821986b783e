"""Start-up: seconds from `otel-ebpf run` starting to /readyz answering 200, cold and warm,
and the memory it takes to get there.

`--targets postgres,mysql,nginx,openssl`, five starts each way, interleaved (cold, warm,
cold, ...); the medians count:

- cold: a fresh, empty cache directory for each start (OTEL_EBPF_CACHE_DIR): every
  binary's ELF facts read and every probe program compiled (in the agent's compiler
  child processes, up to two at once);
- warm: a cache directory primed by one start before the measured ones: what every
  start after the first on a host does.

The operating system's page cache is warm in both (the binaries, the compiler's
libraries): "cold" is about the agent's own cache only.

Per start: seconds to the first HTTP answer and to /readyz 200 (polled every 20 ms);
/readyz's per-binary plan/compile/attach seconds; the agent process's VmHWM (its own
peak); the RSS of the agent and its compiler children together, sampled every 50 ms from
the spawn until ready (pages they share are counted in each); and, on a machine with
cgroup v2 and its memory controller enabled at the root, the memory.peak of a cgroup of
its own the agent starts in (page cache it reads included, what a container limit sees).
"""
from __future__ import annotations

import os
import tempfile
import time

from .agent import BenchAgent
from .procs import BenchError, at_exit, tmp_dir
from .readings import TreeRssSampler
from .receiver import CountingReceiver
from .report import Check, Table, fmt_num
from .stats import median

TARGETS = "postgres,mysql,nginx,openssl"
WARM_LIMIT_S, COLD_LIMIT_S, RSS_LIMIT_MB = 2.0, 4.0, 120.0


# --- a cgroup v2 of its own, for memory.peak ------------------------------------------------------

def cgroup2_root() -> str | None:
    """The cgroup v2 mount point, when its root delegates the memory controller (else None)."""
    try:
        with open("/proc/self/mountinfo") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return None
    for fields in mounts:
        sep = fields.index("-") if "-" in fields else -1
        if sep > 0 and fields[sep + 1] == "cgroup2" and fields[3] == "/":
            root = fields[4]
            try:
                with open(os.path.join(root, "cgroup.subtree_control")) as fh:
                    if "memory" in fh.read().split():
                        return root
            except OSError:
                return None
    return None


class PeakCgroup:
    """A child cgroup of the v2 root (memory controller on) that a process enters by the
    `prefix` command (a shell writes its pid to cgroup.procs, then execs the program)."""

    def __init__(self, root: str):
        self.path = tempfile.mkdtemp(prefix="otel-ebpf-bench-", dir=root)
        at_exit(self.remove)

    @property
    def prefix(self) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path]

    def peak_mb(self) -> float:
        try:
            with open(os.path.join(self.path, "memory.peak")) as fh:
                return int(fh.read().strip()) / (1 << 20)
        except (OSError, ValueError):
            return float("nan")

    def remove(self) -> None:
        for _ in range(50):  # empty once the agent (and its children) have exited
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


# --- one start ----------------------------------------------------------------------------------

def one_start(cache_dir: str, receiver, cg_root: str | None, timeout: float = 60.0) -> dict:
    """Start the agent with `cache_dir`, wait for /readyz 200, take the readings, stop it."""
    agent = BenchAgent("--targets", TARGETS, receiver=receiver, env={"OTEL_EBPF_CACHE_DIR": cache_dir},
                       label="startup", accept_degraded=True)
    cg = PeakCgroup(cg_root) if cg_root else None
    if cg is not None:
        agent.prefix = cg.prefix
    sampler: list[TreeRssSampler] = []
    agent.on_spawn = lambda proc: sampler.append(TreeRssSampler(proc.pid, 0.05).start())
    try:
        agent.start(timeout=timeout)
        if sampler:
            sampler[0].stop().sample()
        mem = agent.memory()
        out = {"ready_s": agent.ready_after, "answer_s": agent.answering_after, "hwm_mb": mem["VmHWM"],
               "rss_mb": mem["VmRSS"], "tree_peak_mb": sampler[0].peak_kb / 1024 if sampler else float("nan"),
               "tree_procs": sampler[0].peak_procs if sampler else 0, "timings": agent.timings(),
               "degraded": agent.degraded, "probes": agent.started_status.get("probes_attached", 0)}
    finally:
        if sampler:
            sampler[0].stop()
        agent.stop()
        peak = cg.peak_mb() if cg is not None else float("nan")
        if cg is not None:
            cg.remove()
    return {**out, "cgroup_peak_mb": peak}


def cache_entries(path: str) -> int:
    try:
        return sum(1 for name in os.listdir(path) if not name.startswith("."))
    except OSError:
        return 0


# --- the benchmark -----------------------------------------------------------------------------------

def run_benchmark(repeats: int = 5, log=print) -> list[Table]:
    cg_root = cgroup2_root()
    receiver = CountingReceiver().start()
    warm_dir = tempfile.mkdtemp(prefix="cache-warm-", dir=tmp_dir())
    starts: dict[str, list[dict]] = {"cold": [], "warm": []}
    entries: dict[str, list[int]] = {"cold": [], "warm": []}
    failures: list[str] = []
    try:
        log(f"startup: priming the warm cache ({TARGETS})")
        try:
            one_start(warm_dir, receiver, None)
        except BenchError as exc:
            failures.append(f"priming start: {exc}")
        for r in range(repeats):
            for kind in (("cold", "warm") if r % 2 == 0 else ("warm", "cold")):
                cache = tempfile.mkdtemp(prefix="cache-cold-", dir=tmp_dir()) if kind == "cold" else warm_dir
                try:
                    s = one_start(cache, receiver, cg_root)
                except BenchError as exc:
                    failures.append(f"{kind} start {r + 1}: {exc}")
                    log(f"startup: {kind}: {exc}")
                    continue
                starts[kind].append(s)
                entries[kind].append(cache_entries(cache))
                log(f"startup: {kind} {r + 1}/{repeats}: ready {s['ready_s']:.2f} s, VmHWM {s['hwm_mb']:.0f} MB, "
                    f"tree peak {s['tree_peak_mb']:.0f} MB{' (degraded)' if s['degraded'] else ''}")
    finally:
        receiver.stop()
    return [summary_table(starts, entries, failures, cg_root, repeats), timings_table(starts)]


def summary_table(starts: dict[str, list[dict]], entries: dict[str, list[int]], failures: list[str],
                  cg_root: str | None, repeats: int) -> Table:
    table = Table(f"Start-up: `otel-ebpf run --targets {TARGETS}` to /readyz 200, {repeats} cold and {repeats} warm "
                  "starts, interleaved",
                  ["start", "seconds to /readyz 200, per start", "median s", "first HTTP answer, median s",
                   "probes attached", "agent VmHWM MB, median / max", "agent + compiler children peak RSS MB, "
                   "median / max", "cgroup memory.peak MB, median", "cache entries after"])
    for kind in ("cold", "warm"):
        ss = starts[kind]
        if not ss:
            table.rows.append([kind, "-", "-", "-", "-", "-", "-", "-", "-"])
            continue
        col = lambda key: [s[key] for s in ss]  # noqa: E731
        table.rows.append([kind, " / ".join(f"{t:.2f}" for t in col("ready_s")), f"{median(col('ready_s')):.2f}",
                           fmt_num(median(col("answer_s")), 2), str(ss[-1]["probes"]),
                           f"{median(col('hwm_mb')):.0f} / {max(col('hwm_mb')):.0f}",
                           f"{median(col('tree_peak_mb')):.0f} / {max(col('tree_peak_mb')):.0f} "
                           f"(up to {max(col('tree_procs'))} processes)",
                           fmt_num(median(col("cgroup_peak_mb")), 0), str(max(entries[kind], default=0))])
        for d in dict.fromkeys(s["degraded"] for s in ss if s["degraded"]):
            table.notes.append(f"{kind}: degraded (/readyz 200 with failed targets): {d}")
    table.notes.append("cold: a new, empty OTEL_EBPF_CACHE_DIR per start; warm: one primed by a start before the "
                       "measured ones. The page cache is warm in both.")
    table.notes.append("agent VmHWM: the agent process's own peak RSS (read once ready); the tree's peak: VmRSS of "
                       "the agent and its compiler children summed, sampled every 50 ms until ready (pages they "
                       "share counted in each)")
    if cg_root is None:
        table.notes.append("cgroup memory.peak: not measured (no cgroup v2 with the memory controller enabled at its "
                           "root on this machine)")
    else:
        table.notes.append(f"cgroup memory.peak: a cgroup of its own under {cg_root} per start, page cache the "
                           "agent and its compilers read included")
    for f in failures:
        table.notes.append(f"failed: {f}")
    for kind, limit in (("warm", WARM_LIMIT_S), ("cold", COLD_LIMIT_S)):
        ts = [s["ready_s"] for s in starts[kind]]
        table.checks.append(Check(f"ready after a {kind} start, all four targets (median)",
                                  f"{median(ts):.2f} s" if ts else "never", f"≤ {limit:g} s",
                                  median(ts) <= limit if ts else False))
    hwm = [s["hwm_mb"] for kind in starts for s in starts[kind]]
    table.checks.append(Check("agent peak RSS at start (VmHWM, highest of the starts)",
                              f"{max(hwm):.0f} MB" if hwm else "not measured", f"≤ {RSS_LIMIT_MB:g} MB",
                              max(hwm) <= RSS_LIMIT_MB if hwm else None))
    return table


def timings_table(starts: dict[str, list[dict]]) -> Table:
    """Per binary: the medians of /readyz's plan, compile and attach seconds, cold and warm."""
    table = Table("Start-up per binary: /readyz's seconds (medians), cold → warm",
                  ["binary", "plan s", "compile s", "attach s"])
    binaries = list(dict.fromkeys(b for kind in starts for s in starts[kind] for b in s["timings"]))
    for b in binaries:
        cells = []
        for phase in ("plan", "compile", "attach"):
            vals = {kind: median([s["timings"][b][phase] for s in starts[kind]
                                  if phase in s["timings"].get(b, {})]) for kind in ("cold", "warm")}
            cells.append(f"{fmt_num(vals['cold'], 3)} → {fmt_num(vals['warm'], 3)}")
        table.rows.append([b, *cells])
    table.notes.append("the binaries are compiled for up to two at once (`otel-ebpf doctor --timings` prints the same "
                       "for one start)")
    return table
