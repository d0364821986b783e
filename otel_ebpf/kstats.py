"""The kernel's own numbers: per-program counters (`stats`) and duration histograms
(`hist`, `hist_sum`), read into the MetricStore with the agent's own counters."""
from __future__ import annotations

import collections
import logging
from typing import Callable, Iterable, Mapping

from .attacher import FAILED, Unit
from .contract import STAT_MAX, Stat
from .metrics import MetricStore
from .targets.base import Target

log = logging.getLogger(__name__)

KERNEL_COUNTERS = (("otel_ebpf.events", Stat.EVENTS), ("otel_ebpf.events.lost", Stat.LOST),
                   ("otel_ebpf.spans.sampled_out", Stat.SAMPLED_OUT),
                   ("otel_ebpf.spans.kept_by_parent", Stat.KEPT_BY_PARENT),
                   ("otel_ebpf.starts.unmatched", Stat.UNMATCHED), ("otel_ebpf.operations", Stat.OPERATIONS))
AGENT_DROP_REASONS = ("queue_full", "export_failed", "decode_error", "shutdown")


class KernelStats:
    def __init__(self, metrics: MetricStore, units: Callable[[], list[Unit]], targets: Callable[[], list[Target]],
                 target_of: Callable[[str], Target]):
        self.metrics = metrics
        self._units = units
        self._targets = targets
        self._target_of = target_of

    def read(self, agent_counts: Mapping[str, int], sampling_ratio: float,
             agent_sampled_out: Mapping[str, int] | None = None, histograms: bool = True) -> None:
        """Every counter, and the histograms unless told not to (they are many map
        entries: read when metrics leave, not every second), cumulative, into the
        MetricStore. `agent_sampled_out`: per target, spans the agent's sampler dropped
        (ratio, unsampled parent) on top of the kernel's."""
        totals = collections.Counter[tuple[str, str]]()
        for name, value in (agent_sampled_out or {}).items():
            totals[("otel_ebpf.spans.sampled_out", name)] += value
        ringbuf: dict[str, float] = {}
        attached = failed = 0
        for unit in self._units():
            if unit.program is not None:
                try:
                    unit.stats = unit.program.percpu_sum("stats", STAT_MAX)
                except Exception:  # noqa: BLE001 - map read during shutdown
                    pass
                attached += len(unit.labels)
            elif unit.state == FAILED:
                failed += 1
            name = unit.target.name
            ringbuf[name] = max(ringbuf.get(name, 0.0), unit.ringbuf_peak)
            unit.ringbuf_peak = 0.0
            for key, index in KERNEL_COUNTERS:
                totals[(key, name)] += unit.stats[index]
        if histograms:
            self.read_histograms(self._units())
        m = self.metrics
        m.set_gauge("otel_ebpf.sampling.ratio", {}, sampling_ratio)
        for (key, name), value in totals.items():
            m.set_counter(key, {"target": name}, value)
        m.set_counter("otel_ebpf.starts.expired", {}, agent_counts.get("starts.expired", 0))
        for target in self._targets():
            for reason, value in target.counters().items():
                m.set_counter("otel_ebpf.target.counts", {"target": target.name, "reason": reason}, value)
        for name, fill in ringbuf.items():
            m.set_gauge("otel_ebpf.ringbuf.usage", {"target": name}, fill)
        m.set_gauge("otel_ebpf.probes.attached", {}, attached)
        m.set_gauge("otel_ebpf.probes.failed", {}, failed)
        m.set_counter("otel_ebpf.spans.exported", {}, agent_counts.get("spans.exported", 0))
        for reason in AGENT_DROP_REASONS:
            m.set_counter("otel_ebpf.spans.dropped", {"reason": reason}, agent_counts.get(f"spans.dropped.{reason}", 0))

    def read_histograms(self, units: Iterable[Unit]) -> None:
        """Cumulative duration histograms from every program's `hist` maps, summed per target."""
        nbuckets = len(self.metrics.buckets) + 1
        per_target: dict[str, dict[int, list]] = {}
        for unit in units:
            if unit.program is None or not unit.target.kernel_histograms:
                continue
            dims = per_target.setdefault(unit.target.name, {})
            try:
                for key, value in unit.program.table_items("hist"):
                    entry = dims.setdefault(key.dim, [[0] * nbuckets, 0])
                    if key.bucket < nbuckets:
                        entry[0][key.bucket] += value.value
                for key, value in unit.program.table_items("hist_sum"):
                    entry = dims.setdefault(key.value, [[0] * nbuckets, 0])
                    entry[1] += value.value
            except Exception:  # noqa: BLE001 - a map read racing shutdown
                log.debug("reading histograms of %s failed", unit.path, exc_info=True)
        for name, dims in per_target.items():
            target = self._target_of(name)
            merged: dict[tuple[str, tuple], list] = {}  # several dims may map to the same series
            for dim, (counts, total_ns) in dims.items():
                metric, attrs = target.hist_series(dim)
                entry = merged.setdefault((metric, tuple(sorted(attrs.items()))), [[0] * nbuckets, 0])
                entry[0] = [a + b for a, b in zip(entry[0], counts)]
                entry[1] += total_ns
            for (metric, attrs_key), (counts, total_ns) in merged.items():
                self.metrics.set_histogram(metric, dict(attrs_key), counts, total_ns / 1e9)
