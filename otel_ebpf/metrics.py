"""Cumulative metrics: duration histograms, counters and gauges, exported as OTLP and
Prometheus text.

Histograms arrive already bucketed (from the kernel's maps, or from spans), which the
OpenTelemetry SDK's instruments cannot take, so this store renders the OTLP data
points itself and sends them through the SDK exporter's transport (export.OtlpTransport).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality, Exemplar, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from .export import SCOPE, to_key_values
from .targets.base import DURATION_BUCKETS

Attrs = tuple[tuple[str, object], ...]
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

# Descriptions and units of what the agent exports.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "db.server.operation.duration": ("s", "Duration of database operations seen inside the server"),
    "http.server.request.duration": ("s", "Duration of HTTP server requests"),
    "http.client.request.duration": ("s", "Duration of HTTP client requests"),
    "otel_ebpf.target.counts": ("{event}", "What a target counted or dropped while decoding, by reason"),
    "otel_ebpf.db.slow_operations": ("{operation}", "Database operations slower than the slow threshold"),
    "otel_ebpf.events": ("{event}", "Records the kernel side wrote to the ring buffer"),
    "otel_ebpf.events.lost": ("{event}", "Records lost because the ring buffer was full"),
    "otel_ebpf.starts.unmatched": ("{event}", "Ends without a start, or starts overwritten"),
    "otel_ebpf.starts.expired": ("{event}", "Starts dropped because their thread exited mid-operation"),
    "otel_ebpf.operations": ("{operation}", "Operations the kernel side saw finish"),
    "otel_ebpf.spans.exported": ("{span}", "Spans sent to the exporter successfully"),
    "otel_ebpf.spans.dropped": ("{span}", "Spans dropped (queue full, export failed)"),
    "otel_ebpf.probes.attached": ("{probe}", "Probe points attached"),
    "otel_ebpf.probes.failed": ("{probe}", "Probe points that could not be attached"),
    "otel_ebpf.sampling.ratio": ("1", "Span sampling ratio in force (lowered above the span rate limit)"),
    "otel_ebpf.ringbuf.usage": ("1", "Fraction of the ring buffer in use at the last read"),
}


@dataclass
class _Hist:
    counts: list[int]
    sum: float = 0.0
    count: int = 0
    exemplar_trace: bytes = b""


@dataclass
class MetricStore:
    buckets: tuple[float, ...] = DURATION_BUCKETS
    start_ns: int = field(default_factory=time.time_ns)
    max_series: int = 2000  # per metric; past it, attributes collapse to an overflow series
    _hists: dict[str, dict[Attrs, _Hist]] = field(default_factory=dict)
    _counters: dict[str, dict[Attrs, float]] = field(default_factory=dict)
    _gauges: dict[str, dict[Attrs, float]] = field(default_factory=dict)
    _exemplars: dict[str, dict[Attrs, tuple[int, float, bytes, bytes]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_exemplar(self, name: str, attrs: dict[str, object], seconds: float, time_ns: int,
                     trace_id: bytes, span_id: bytes) -> None:
        """Link a histogram series to a kept span (the latest one wins)."""
        key = tuple(sorted((k, v) for k, v in attrs.items() if v is not None))
        table = self._exemplars.setdefault(name, {})
        if key in table or len(table) < self.max_series:
            # a plain tuple per span; the protobuf message is built at export only
            table[key] = (time_ns, seconds, trace_id, span_id)

    def _key(self, table: dict, attrs: dict[str, object]) -> Attrs:
        key = tuple(sorted((k, v) for k, v in attrs.items() if v is not None))
        if key not in table and len(table) >= self.max_series:
            return (("otel.metric.overflow", True),)
        return key

    def record_duration(self, name: str, attrs: dict[str, object], seconds: float) -> None:
        with self._lock:
            table = self._hists.setdefault(name, {})
            key = self._key(table, attrs)
            h = table.get(key)
            if h is None:
                h = table[key] = _Hist([0] * (len(self.buckets) + 1))
            h.counts[_bucket(self.buckets, seconds)] += 1
            h.sum += seconds
            h.count += 1

    def set_histogram(self, name: str, attrs: dict[str, object], counts: list[int], total: float) -> None:
        """Replace a series with cumulative counts read from the kernel."""
        with self._lock:
            table = self._hists.setdefault(name, {})
            key = self._key(table, attrs)
            table[key] = _Hist(list(counts), total, sum(counts))

    def add(self, name: str, attrs: dict[str, object], value: float = 1) -> None:
        with self._lock:
            table = self._counters.setdefault(name, {})
            key = self._key(table, attrs)
            table[key] = table.get(key, 0) + value

    def set_counter(self, name: str, attrs: dict[str, object], value: float) -> None:
        with self._lock:
            table = self._counters.setdefault(name, {})
            table[self._key(table, attrs)] = value

    def set_gauge(self, name: str, attrs: dict[str, object], value: float) -> None:
        with self._lock:
            table = self._gauges.setdefault(name, {})
            table[self._key(table, attrs)] = value

    def counter_value(self, name: str, **match: object) -> float:
        with self._lock:
            return sum(v for k, v in self._counters.get(name, {}).items()
                       if all(dict(k).get(a) == v2 for a, v2 in match.items()))

    # --- rendering ----------------------------------------------------------------

    def otlp_request(self, resource_attrs: dict[str, object]) -> ExportMetricsServiceRequest:
        now = time.time_ns()
        metrics: list[Metric] = []
        with self._lock:
            for name, table in self._hists.items():
                unit, desc = METRIC_INFO.get(name, ("", ""))
                exemplars = self._exemplars.get(name, {})
                metrics.append(Metric(name=name, unit=unit, description=desc, histogram=Histogram(
                    aggregation_temporality=CUMULATIVE,
                    data_points=[HistogramDataPoint(
                        attributes=to_key_values(dict(k)), start_time_unix_nano=self.start_ns,
                        time_unix_nano=now, count=h.count, sum=h.sum, bucket_counts=h.counts,
                        explicit_bounds=self.buckets,
                        exemplars=[_exemplar(exemplars[k])] if k in exemplars else None)
                        for k, h in table.items()])))
            for name, table in self._counters.items():
                unit, desc = METRIC_INFO.get(name, ("", ""))
                metrics.append(Metric(name=name, unit=unit, description=desc, sum=Sum(
                    aggregation_temporality=CUMULATIVE, is_monotonic=True,
                    data_points=[_number(k, v, self.start_ns, now) for k, v in table.items()])))
            for name, table in self._gauges.items():
                unit, desc = METRIC_INFO.get(name, ("", ""))
                metrics.append(Metric(name=name, unit=unit, description=desc, gauge=Gauge(
                    data_points=[_number(k, v, 0, now) for k, v in table.items()])))
        return ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
            resource=Resource(attributes=to_key_values(resource_attrs)),
            scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=metrics)])])

    def prometheus_text(self) -> str:
        """Prometheus text exposition, named as the collector's prometheus exporter names them."""
        out: list[str] = []
        with self._lock:
            for name, table in sorted(self._hists.items()):
                base = prom_name(name, "s")
                out.append(f"# TYPE {base} histogram")
                for key, h in table.items():
                    labels = dict(key)
                    cumulative = 0
                    for bound, n in zip(self.buckets, h.counts):
                        cumulative += n
                        out.append(f"{base}_bucket{_labels(labels, le=_fmt(bound))} {cumulative}")
                    out.append(f"{base}_bucket{_labels(labels, le='+Inf')} {h.count}")
                    out.append(f"{base}_sum{_labels(labels)} {_fmt(h.sum)}")
                    out.append(f"{base}_count{_labels(labels)} {h.count}")
            for name, table in sorted(self._counters.items()):
                base = prom_name(name, METRIC_INFO.get(name, ("", ""))[0]) + "_total"
                out.append(f"# TYPE {base} counter")
                out += [f"{base}{_labels(dict(k))} {_fmt(v)}" for k, v in table.items()]
            for name, table in sorted(self._gauges.items()):
                unit = METRIC_INFO.get(name, ("", ""))[0]
                base = prom_name(name, unit)
                out.append(f"# TYPE {base} gauge")
                out += [f"{base}{_labels(dict(k))} {_fmt(v)}" for k, v in table.items()]
        return "\n".join(out) + "\n"


def _exemplar(e: tuple[int, float, bytes, bytes]) -> Exemplar:
    time_ns, seconds, trace_id, span_id = e
    return Exemplar(time_unix_nano=time_ns, as_double=seconds, trace_id=trace_id, span_id=span_id)


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    for i, b in enumerate(bounds):
        if value <= b:
            return i
    return len(bounds)


def _number(key: Attrs, value: float, start: int, now: int) -> NumberDataPoint:
    kw = {"as_int": int(value)} if float(value).is_integer() else {"as_double": float(value)}
    return NumberDataPoint(attributes=to_key_values(dict(key)), start_time_unix_nano=start,
                           time_unix_nano=now, **kw)


def prom_name(name: str, unit: str) -> str:
    base = "".join(c if c.isalnum() else "_" for c in name)
    if unit == "s":
        base += "_seconds"
    elif unit == "1":
        base += "_ratio"
    return base


def _labels(labels: dict[str, object], **extra: str) -> str:
    items = [(prom_name(k, ""), v) for k, v in labels.items()] + list(extra.items())
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: object) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf"
    return repr(value) if isinstance(value, float) else str(value)
