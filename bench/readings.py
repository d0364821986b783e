"""Readings of other processes from /proc: CPU, memory, children; Prometheus text.

The per-process readers are the ones the agent runner uses (tests/support/agent.py);
this module adds process trees (a server and its workers, the agent and its compiler
children) and a sampler of a tree's RSS.
"""
from __future__ import annotations

import os
import re
import threading

from tests.support.agent import CLK_TCK, proc_stat_fields
from tests.support.agent import proc_cpu_seconds as cpu_seconds
from tests.support.agent import proc_status_kb as status_kb

__all__ = ["CLK_TCK", "TreeRssSampler", "children_of", "cpu_seconds", "descendants_of", "parents", "proc_stat_fields",
           "prometheus_sum", "status_kb", "tree_cpu_seconds", "tree_rss_kb"]


def parents() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = proc_stat_fields(int(name))
            if f is not None:
                out[int(name)] = int(f[1])
    return out


def children_of(pid: int) -> list[int]:
    return [p for p, pp in parents().items() if pp == pid]


def descendants_of(pid: int, table: dict[int, int] | None = None) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    table = parents() if table is None else table
    kids: dict[int, list[int]] = {}
    for p, pp in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU of a server: the root (with its reaped children: exited backends) and live children."""
    return cpu_seconds(root, children=True) + sum(cpu_seconds(c, children=True) for c in children_of(root))


def tree_rss_kb(root: int) -> int:
    """VmRSS of `root` and every process below it, summed (shared pages counted in each)."""
    return sum(status_kb(p, "VmRSS") for p in (root, *descendants_of(root)))


class TreeRssSampler:
    """Samples the RSS of a process tree every `interval` s from a thread, until stop():
    `peak_kb` is the highest sum seen, `peak_root_kb` the root's own highest VmRSS."""

    def __init__(self, root: int, interval: float = 0.05):
        self.root = root
        self.interval = interval
        self.peak_kb = 0
        self.peak_root_kb = 0
        self.peak_procs = 0  # processes in the tree at the peak
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        procs = (self.root, *descendants_of(self.root))
        sizes = [status_kb(p, "VmRSS") for p in procs]
        self.samples += 1
        if sum(sizes) > self.peak_kb:
            self.peak_kb, self.peak_procs = sum(sizes), len(procs)
        self.peak_root_kb = max(self.peak_root_kb, sizes[0])

    def start(self) -> "TreeRssSampler":
        self._thread.start()
        return self

    def stop(self) -> "TreeRssSampler":
        self._stop.set()
        self._thread.join(5)
        return self


def prometheus_sum(text: str, metric: str, **labels: str) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != metric:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total
