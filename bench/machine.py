"""What else runs on this (shared) machine: other processes' CPU during a measurement,
and other eBPF tools, whose probes on the same binary would sit in a no-probe baseline.
"""
from __future__ import annotations

import os
import re
import time

from .readings import CLK_TCK, proc_stat_fields

_TRACER_RE = re.compile(r"otel_ebpf\.cli run|otel-ebpf run|bpftrace|-bpfcc|/usr/share/bcc/tools/")


def _snapshot() -> dict[int, tuple[int, float, int]]:
    """pid -> (parent pid, CPU seconds, start time in ticks) of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = proc_stat_fields(int(name))
        if f is not None:
            out[int(name)] = (int(f[1]), (int(f[11]) + int(f[12])) / CLK_TCK, int(f[19]))
    return out


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None


class MachineWatch:
    """Other processes' CPU (in cores) and other eBPF tools between start() and stop()."""

    def __init__(self, own_roots: tuple[int, ...] = ()):
        self.own_roots = {os.getpid(), *own_roots}
        self._t0 = 0.0
        self._cpu0: dict[int, tuple[int, float]] = {}

    def foreign(self, snap: dict[int, tuple[int, float, int]]) -> set[int]:
        """Processes not below this bench or one of `own_roots`."""
        out = set()
        for pid in snap:
            p, seen = pid, 0
            while p > 1 and p not in self.own_roots and seen < 64:
                p = snap.get(p, (1,))[0]
                seen += 1
            if p not in self.own_roots:
                out.add(pid)
        return out

    def start(self) -> "MachineWatch":
        self._cpu0 = {pid: (v[2], v[1]) for pid, v in _snapshot().items()}
        self._t0 = time.monotonic()
        return self

    def stop(self) -> tuple[float, list[str]]:
        """(other processes' CPU in cores, other eBPF tools' command lines) since start()."""
        snap = _snapshot()
        wall = max(time.monotonic() - self._t0, 1e-3)
        used = 0.0
        tracers = []
        for pid in self.foreign(snap):
            _ppid, cpu, start = snap[pid]
            before = self._cpu0.get(pid)
            used += cpu - (before[1] if before and before[0] == start else 0.0)
            argv = _cmdline(pid)
            if argv is not None:
                cmd = " ".join(argv).strip()
                if _TRACER_RE.search(cmd):
                    tracers.append(cmd[:120])
        return used / wall, tracers


def foreign_tracers(target: str | None = None) -> list[str]:
    """Command lines of eBPF tools running on this machine that this bench did not start; with
    `target` ("postgres", "nginx", "mysql"), only those that may have probes on its binaries."""
    out = []
    for pid in MachineWatch().foreign(_snapshot()):
        argv = _cmdline(pid)
        if argv is None:
            continue
        cmd = " ".join(argv).strip()
        if not _TRACER_RE.search(cmd):
            continue
        if target is not None and not may_probe(argv, cmd, target):
            continue
        out.append(cmd[:160])
    return out


def may_probe(argv: list[str], cmd: str, target: str) -> bool:
    """Whether a tool's command line may attach to `target`'s binaries."""
    if "otel_ebpf.cli" in cmd or "otel-ebpf" in cmd:
        if "--targets" in argv:
            i = argv.index("--targets")
            return i + 1 < len(argv) and target in argv[i + 1].split(",")
        return not any(a.startswith("--targets=") and target not in a for a in argv)  # all targets
    if target in cmd:
        return True
    for a in argv[1:]:  # a bpftrace script file: does it name the target?
        if a.endswith((".bt", ".py")) and os.path.isfile(a):
            try:
                with open(a, errors="replace") as fh:
                    return target in fh.read()
            except OSError:
                return True
    return "bpftrace" in cmd and "-e" not in argv  # unknown script: assume it may


class QuietWait:
    """Before a measurement, wait (within a budget for the whole run) until no other eBPF tool
    that may probe the same target runs here."""

    budget_s = 0.0
    waited_s = 0.0

    @classmethod
    def wait(cls, log=None, target: str | None = None) -> list[str]:
        """The tools still running when it gave up ([] when quiet)."""
        tracers = foreign_tracers(target)
        announced = False
        while tracers and cls.waited_s < cls.budget_s:
            if log is not None and not announced:
                log(f"waiting for {len(tracers)} other eBPF tool(s) to finish: {tracers[0][:100]}")
                announced = True
            time.sleep(1.0)
            cls.waited_s += 1.0
            tracers = foreign_tracers(target)
        return tracers


def noise_note(other_cores: float, tracers: list[str]) -> str:
    notes = []
    if other_cores >= 0.1:
        notes.append(f"other load {other_cores:.1f} cores")
    if tracers:
        notes.append(f"{len(tracers)} other eBPF tool(s) running")
    return "; ".join(notes)
