"""The other tools the benchmarks compare the agent with: bpftrace and dbslower-bpfcc,
and the agent's own probe points (from its plan) written as bpftrace probes.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from .procs import BenchError, require_tool, spawn, stop, tmp_dir


def collect_lines(proc: subprocess.Popen, lines: list[str], ready_prefix: str) -> threading.Event:
    """Append `proc`'s output lines to `lines` from a thread; the event is set by the first
    line starting with `ready_prefix` (the tool says it is attached), or when output ends."""
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(ready_prefix):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    return ready


class Bpftrace:
    """bpftrace with a script; ready once it printed "Attaching N probes" (+ a short settle)."""

    def __init__(self, script: str, label: str = "bpftrace"):
        self.bin = require_tool("bpftrace")
        self.script = script
        self.script_path = os.path.join(tmp_dir(), f"{label}-{os.getpid()}-{time.monotonic_ns()}.bt")
        with open(self.script_path, "w") as fh:
            fh.write(script)
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> "Bpftrace":
        self.proc = spawn([self.bin, self.script_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        attached = collect_lines(self.proc, self._lines, "Attaching")
        if not attached.wait(timeout) or self.proc.poll() is not None:
            out = "".join(self._lines)
            self.stop()
            raise BenchError(f"bpftrace did not attach: {out[-800:]}")
        time.sleep(1.0)  # "Attaching" is printed before the probes are; a margin for them
        if self.proc.poll() is not None:
            raise BenchError(f"bpftrace exited: {''.join(self._lines)[-800:]}")
        return self

    def stop(self) -> str:
        """SIGINT (bpftrace prints its maps), then the whole output."""
        stop(self.proc, signal.SIGINT, timeout=30.0)
        time.sleep(0.05)
        return "".join(self._lines)

    @staticmethod
    def scalar(output: str, name: str) -> int | None:
        """The value of a scalar map line such as "@n: 1234" (None when not printed)."""
        m = re.search(rf"^@{re.escape(name)}: (\d+)\s*$", output, re.M)
        return int(m.group(1)) if m else None


class Dbslower:
    """dbslower-bpfcc postgres -p PIDS -m THRESHOLD, its output collected line by line."""

    def __init__(self, pids: list[int], threshold_ms: int):
        self.bin = require_tool("dbslower-bpfcc")
        self.argv = [self.bin, "postgres", "-p", *map(str, pids), "-m", str(threshold_ms)]
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

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


# --- the agent's probe points, for bpftrace ----------------------------------------------------

@dataclass(frozen=True)
class ProbePoint:
    """One probe point of the agent's plan, as bpftrace names it."""

    kind: str  # "uprobe", "uretprobe" or "usdt"
    where: str  # a symbol, or "provider:name" for usdt
    label: str  # the agent's label
    fn_name: str  # the agent's BPF function there

    def bpftrace(self, path: str) -> str:
        return f"{self.kind}:{path}:{self.where}"


def _is_usdt_label(label: str) -> bool:
    return re.fullmatch(r"\w+:\w+", label) is not None


def agent_probe_points(target_cls, target_name: str, path: str) -> list[ProbePoint]:
    """Every probe point the agent attaches to `path` (`target_cls().plan(...).attach`): file
    offsets mapped back to symbols through `elf_info(path)`; USDT points by provider:name
    (bpftrace then attaches every site of that probe, where the agent may attach one)."""
    from otel_ebpf.config import Config
    from otel_ebpf.elf import elf_info

    plan = target_cls().plan(path, Config(targets=(target_name,)))
    info = elf_info(path)
    by_offset: dict[int, list[str]] = {}
    for sym in info.symbols_matching(r"[A-Za-z_][\w.@]*"):
        if sym.file_offset >= 0:
            by_offset.setdefault(sym.file_offset, []).append(sym.name)
    points = []
    for spec in plan.attach:
        if _is_usdt_label(spec.label):
            points.append(ProbePoint("usdt", spec.label, spec.label, spec.fn_name))
            continue
        names = by_offset.get(spec.offset)
        if not names:
            raise BenchError(f"no symbol at file offset {spec.offset:#x} of {path} ({spec.label})")
        # Aliases at one offset: prefer the one the label names.
        name = next((n for n in names if n in spec.label), names[0])
        points.append(ProbePoint("uretprobe" if spec.retprobe else "uprobe", name, spec.label, spec.fn_name))
    return points


def usdt_sites(path: str, provider: str, name: str) -> int:
    """How many sites (locations) a USDT probe has in `path`."""
    from otel_ebpf.elf import elf_info

    return sum(1 for p in elf_info(path).probes if p.provider == provider and p.name == name)
