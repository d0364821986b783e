"""Span accounting: what each decoded span feeds before it is exported.

For every span: the duration histogram of targets the kernel does not count itself, and
the slow-operation counter. Then the sampling decision for those targets (kernel-counted
targets were sampled in the kernel already) and the parent-based sampler; kept spans get
their ids, become exemplars, and slow ones are logged. Pure logic: no kernel, no I/O.
"""
from __future__ import annotations

import collections
import random
from typing import Callable

from opentelemetry.semconv.attributes import db_attributes as DB

from .config import Config
from .metrics import MetricStore
from .targets.base import SpanData, Target
from .tracecontext import new_ids, new_span_id, sampler_drops


class SpanAccountant:
    def __init__(self, config: Config, metrics: MetricStore, target_of: Callable[[str], Target],
                 keep: Callable[[list[SpanData], list[SpanData]], None], rng: random.Random | None = None):
        self.config = config
        self.metrics = metrics
        self._target_of = target_of
        self._keep = keep  # (kept spans, slow ones among them) -> the export worker
        self._rng = rng or random.Random()
        self.counts = collections.Counter[str]()  # spans.sampled_out, spans.parent_unsampled
        self.sampled_out_by_target = collections.Counter[str]()  # both of those, per target

    def account(self, spans: list[SpanData]) -> None:
        slow_s = self.config.slow_threshold_s
        ratio = self.config.sample_ratio
        sampler = self.config.traces_sampler
        keep: list[SpanData] = []
        slow_spans: list[SpanData] = []
        for s in spans:
            target = self._target_of(s.target)
            duration = s.duration_s
            metric, names = target.metric_of(s)
            attrs = {k: s.attributes.get(k) for k in names}
            if not target.kernel_histograms:
                self.metrics.record_duration(metric, attrs, duration)
            is_slow = duration >= slow_s
            if is_slow and DB.DB_SYSTEM_NAME in s.attributes:
                self.metrics.add("otel_ebpf.db.slow_operations", {
                    DB.DB_SYSTEM_NAME: s.attributes.get(DB.DB_SYSTEM_NAME),
                    DB.DB_QUERY_SUMMARY: s.attributes.get(DB.DB_QUERY_SUMMARY, ""),
                    DB.DB_NAMESPACE: s.attributes.get(DB.DB_NAMESPACE, ""),
                })
            if sampler_drops(s, sampler):
                self.counts["spans.parent_unsampled"] += 1
                self.sampled_out_by_target[s.target] += 1
                continue
            if (ratio < 1.0 and not target.kernel_histograms and not s.error and not is_slow
                    and not s.parent_span_id and self._rng.random() >= ratio):
                self.counts["spans.sampled_out"] += 1
                self.sampled_out_by_target[s.target] += 1
                continue
            if s.trace_id is None:
                s.trace_id, s.span_id = new_ids()
            elif s.span_id is None:
                s.span_id = new_span_id()
            self.metrics.set_exemplar(metric, attrs, duration, s.end_ns, s.trace_id, s.span_id)
            if is_slow:
                slow_spans.append(s)
            keep.append(s)
        if keep:
            self._keep(keep, slow_spans)
