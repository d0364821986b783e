"""Cumulative metrics: duration histograms, counters and gauges, exported as OTLP and
in Prometheus' exposition formats (through prometheus_client).

Histograms arrive already bucketed (from the kernel's maps, or from spans), which the
OpenTelemetry SDK's instruments cannot take, so this store renders the OTLP data
points itself and sends them through the SDK exporter's transport (export.OtlpTransport).
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterator

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality, Exemplar, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.core import Metric as Metric_
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.samples import Exemplar as PromExemplar

from .contract import DURATION_BUCKETS
from .protobuf import SCOPE, to_key_values

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
    "otel_ebpf.spans.sampled_out": ("{span}", "Operations not made spans by sampling (in the kernel or the agent)"),
    "otel_ebpf.spans.kept_by_parent": ("{span}", "Spans kept past the span budget because their parent was sampled"),
    "otel_ebpf.probes.attached": ("{probe}", "Probe points attached"),
    "otel_ebpf.probes.failed": ("{probe}", "Probe points that could not be attached"),
    "otel_ebpf.sampling.ratio": ("1", "Span sampling ratio configured (the span budget samples further)"),
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

    def summary(self) -> dict[str, object]:
        """A compact view for the console metrics exporter: counts and sums per series."""
        with self._lock:
            out: dict[str, object] = {}
            for name, table in self._hists.items():
                out[name] = [{"attributes": dict(k), "count": h.count, "sum": round(h.sum, 6)} for k, h in table.items()]
            for kind in (self._counters, self._gauges):
                for name, table in kind.items():
                    out[name] = [{"attributes": dict(k), "value": v} for k, v in table.items()]
            return out

    def series_count(self) -> int:
        with self._lock:
            return sum(len(t) for kind in (self._hists, self._counters, self._gauges, self._exemplars)
                       for t in kind.values())

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
        """Prometheus text exposition of the store (see prometheus_exposition)."""
        return prometheus_exposition(self)[0].decode("utf-8")

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


# --- Prometheus exposition ------------------------------------------------------------
#
# /metrics renders the store through prometheus_client: a collector yields metric
# families from the store's data into a registry of its own, and the library writes
# the format and escapes label values (query summaries and paths come from watched
# programs). Names follow the collector's prometheus exporter (pkg/translator/prometheus,
# the normalization its `add_metric_suffixes` default turns on), so that a series is
# named the same whichever way it reaches Prometheus.

# The instrument each metric is recorded with, hence its Prometheus type and suffixes:
# histograms from record_duration/set_histogram, counters from add/set_counter, gauges
# from set_gauge. tests/unit/test_stack.py derives the names the dashboard and the alert
# rules may use from this and METRIC_INFO.
METRIC_KINDS: dict[str, str] = {
    "db.server.operation.duration": "histogram",
    "http.server.request.duration": "histogram",
    "http.client.request.duration": "histogram",
    "otel_ebpf.target.counts": "counter",
    "otel_ebpf.db.slow_operations": "counter",
    "otel_ebpf.events": "counter",
    "otel_ebpf.events.lost": "counter",
    "otel_ebpf.starts.unmatched": "counter",
    "otel_ebpf.starts.expired": "counter",
    "otel_ebpf.operations": "counter",
    "otel_ebpf.spans.exported": "counter",
    "otel_ebpf.spans.dropped": "counter",
    "otel_ebpf.spans.sampled_out": "counter",
    "otel_ebpf.spans.kept_by_parent": "counter",
    "otel_ebpf.probes.attached": "gauge",
    "otel_ebpf.probes.failed": "gauge",
    "otel_ebpf.sampling.ratio": "gauge",
    "otel_ebpf.ringbuf.usage": "gauge",
}

# UCUM units -> Prometheus unit words (the collector's unitMap and perUnitMap).
_UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes",
    "GiBy": "gibibytes", "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "TBy": "terabytes", "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts",
    "g": "grams", "Cel": "celsius", "Hz": "hertz", "1": "", "%": "percent",
}
_PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month",
                   "y": "year"}
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]+")


def prometheus_name(name: str, unit: str, kind: str) -> str:
    """The metric name the collector's prometheus exporter gives an OTLP metric.

    Tokens of the name (split at anything not a letter or digit), the unit word unless
    the name has it already (`s` -> `seconds`; units in braces add nothing), `per_<unit>`
    for `x/y` units, `total` last for counters, `ratio` last for gauges of unit "1"."""
    tokens = [t for t in _NON_ALNUM.split(name) if t]
    main, _, per = unit.partition("/")
    main, per = main.strip(), per.strip()
    if main and not set("{}") & set(main):
        word = "_".join(t for t in _NON_ALNUM.split(_UNIT_WORDS.get(main, main)) if t)
        if word and word not in tokens:
            tokens.append(word)
    if per and not set("{}") & set(per):
        word = "_".join(t for t in _NON_ALNUM.split(_PER_UNIT_WORDS.get(per, per)) if t)
        if word and word not in tokens:
            tokens += ["per", word]
    if kind == "counter":
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    out = "_".join(tokens)
    return "_" + out if out[:1].isdigit() else out


def prometheus_series_names(name: str) -> tuple[str, ...]:
    """The series names one of the agent's metrics (METRIC_INFO) has in Prometheus."""
    kind = METRIC_KINDS[name]
    base = prometheus_name(name, METRIC_INFO[name][0], kind)
    if kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


def prometheus_label_name(key: str) -> str:
    """An attribute key as the collector's exporter turns it into a label name."""
    label = re.sub(r"[^A-Za-z0-9]", "_", key)
    if label[:1].isdigit():
        return "key_" + label
    if label.startswith("_") and not label.startswith("__"):
        return "key" + label
    return label


def prometheus_label_value(value: object) -> str:
    """Label values are text: bytes and lone surrogates (non-UTF-8 read from a watched
    program) become U+FFFD, booleans lower case as OTLP's would. Escaping (quotes,
    backslashes, newlines) is the library's."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:  # surrogateescape'd bytes: decode them as the bytes they were
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # lone surrogates of another origin
            text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


def _go_float(value: float) -> str:
    """A bucket bound as the Go exporters write `le` (0.005, 1, 10, +Inf)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return format(Decimal(repr(float(value))).normalize(), "f")


class _StoreCollector:
    """A prometheus_client collector over one MetricStore, read under its lock."""

    def __init__(self, store: MetricStore):
        self._store = store

    def collect(self) -> Iterator[Metric_]:
        store = self._store
        with store._lock:  # copy out, render outside the lock
            hists = [(name, [(k, list(h.counts), h.sum, h.count, store._exemplars.get(name, {}).get(k))
                             for k, h in table.items()]) for name, table in sorted(store._hists.items())]
            counters = [(name, list(table.items())) for name, table in sorted(store._counters.items())]
            gauges = [(name, list(table.items())) for name, table in sorted(store._gauges.items())]
        bounds = store.buckets
        for name, series in hists:
            unit, doc = METRIC_INFO.get(name, ("s", ""))
            base = prometheus_name(name, unit, "histogram")
            family = HistogramMetricFamily(base, doc or name)
            for key, counts, total, count, exemplar in series:
                labels = _labels(key)
                cumulative = 0
                for i, (bound, n) in enumerate(zip(bounds, counts)):
                    cumulative += n
                    family.add_sample(f"{base}_bucket", {**labels, "le": _go_float(bound)}, cumulative,
                                      exemplar=_prom_exemplar(exemplar, bounds, i))
                family.add_sample(f"{base}_bucket", {**labels, "le": "+Inf"}, count,
                                  exemplar=_prom_exemplar(exemplar, bounds, len(bounds)))
                family.add_sample(f"{base}_count", labels, count)
                family.add_sample(f"{base}_sum", labels, total)
            yield family
        for name, series in counters:
            unit, doc = METRIC_INFO.get(name, ("", ""))
            total_name = prometheus_name(name, unit, "counter")
            family = CounterMetricFamily(total_name, doc or name)  # keeps the name less _total
            for key, value in series:
                family.add_sample(total_name, _labels(key), value)
            yield family
        for name, series in gauges:
            unit, doc = METRIC_INFO.get(name, ("", ""))
            base = prometheus_name(name, unit, "gauge")
            family = GaugeMetricFamily(base, doc or name)
            for key, value in series:
                family.add_sample(base, _labels(key), value)
            yield family


def _labels(key: Attrs) -> dict[str, str]:
    return {prometheus_label_name(k): prometheus_label_value(v) for k, v in key}


def _prom_exemplar(e: tuple[int, float, bytes, bytes] | None, bounds: tuple[float, ...],
                   index: int) -> PromExemplar | None:
    """The exemplar on the bucket its value falls in (OpenMetrics output only)."""
    if e is None or _bucket(bounds, e[1]) != index:
        return None
    time_ns, seconds, trace_id, span_id = e
    return PromExemplar({"trace_id": trace_id.hex(), "span_id": span_id.hex()}, seconds, time_ns / 1e9)


def prometheus_exposition(store: MetricStore, accept: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of /metrics for `store`.

    The Prometheus text format by default; with the request's Accept header, whatever
    prometheus_client negotiates from it (OpenMetrics carries the exemplars)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreCollector(store))
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
