"""Resources per watched process, and span/metric exporters: console, JSON lines, OTLP.

OTLP spans are not built through the SDK's tracer: its per-span cost (about 137 µs
here) is too high for the hot path. Batches of SpanData become
`ExportTraceServiceRequest` messages directly and go out through the SDK's own
OTLP exporters (gRPC or http/protobuf), so endpoint, headers, timeout,
compression, TLS and retries still come from the standard OTEL_EXPORTER_OTLP_*
variables and the exporters' code.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import sys
import threading
import time
from typing import IO, Iterable, Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs, SeverityNumber
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.semconv._incubating.attributes import (
    container_attributes as CONTAINER,
    host_attributes as HOST,
    process_attributes as PROCESS,
)
from opentelemetry.semconv.attributes import db_attributes as DB, service_attributes as SERVICE

from . import __version__, process
from .targets.base import SpanData

log = logging.getLogger(__name__)
SCOPE = InstrumentationScope(name="otel-ebpf", version=__version__)


# --- Resources ------------------------------------------------------------------


class ResourceCache:
    """Resource attributes of each watched process, read once per process identity."""

    MAX_PROCESSES = 1024  # least recently used first out: short-lived clients come and go
    # A cached pid is checked against /proc (its start time: a reused pid is another
    # process) at most this often: every drain asks for the pids it saw.
    RECHECK_S = 1.0

    def __init__(self, service_name_override: str | None = None):
        self._by_pid: collections.OrderedDict[int, tuple[int, dict[str, object], Resource]] = \
            collections.OrderedDict()
        self._override = service_name_override
        self._lock = threading.Lock()
        self._checked_at: dict[int, float] = {}

    def attributes(self, pid: int) -> dict[str, object]:
        return self._entry(pid)[1]

    def proto(self, pid: int) -> Resource:
        return self._entry(pid)[2]

    def _entry(self, pid: int) -> tuple[int, dict[str, object], Resource]:
        now = time.monotonic()
        with self._lock:
            cached = self._by_pid.get(pid)
            if cached is not None and now - self._checked_at.get(pid, 0.0) < self.RECHECK_S:
                return cached
        fields = process.stat_fields(pid)
        start = fields[2] if fields else -1
        with self._lock:
            cached = self._by_pid.get(pid)
            # A process that exited keeps its cached Resource (its spans may still be queued).
            if cached is not None and (start == -1 or cached[0] == start):
                self._by_pid.move_to_end(pid)
                self._checked_at[pid] = now
                return cached
        attrs = self._read(pid, fields)
        entry = (start, attrs, Resource(attributes=to_key_values(attrs)))
        with self._lock:
            self._by_pid[pid] = entry
            self._by_pid.move_to_end(pid)
            self._checked_at[pid] = now
            while len(self._by_pid) > self.MAX_PROCESSES:
                self._checked_at.pop(self._by_pid.popitem(last=False)[0], None)
        return entry

    def forget_exited(self, idle_s: float = 60.0) -> int:
        """Drop the Resources of processes that exited and were not asked for in `idle_s`
        (their spans are long exported): short-lived clients would otherwise keep up to
        MAX_PROCESSES entries. Returns how many were dropped."""
        now = time.monotonic()
        with self._lock:
            idle = [pid for pid in self._by_pid if now - self._checked_at.get(pid, 0.0) > idle_s]
        gone = [pid for pid in idle if not os.path.exists(f"/proc/{pid}")]
        with self._lock:
            for pid in gone:
                self._by_pid.pop(pid, None)
                self._checked_at.pop(pid, None)
        return len(gone)

    def _read(self, pid: int, fields: tuple[str, int, int] | None) -> dict[str, object]:
        info = process.proc_info(pid)
        exe_name = os.path.basename(info.exe) if info and info.exe else (fields[0] if fields else "unknown")
        service = self._override or process.environ_value(pid, "OTEL_SERVICE_NAME") or exe_name
        attrs: dict[str, object] = {
            SERVICE.SERVICE_NAME: service,
            PROCESS.PROCESS_PID: pid,
            PROCESS.PROCESS_EXECUTABLE_NAME: exe_name,
            HOST.HOST_NAME: process.host_name(),
        }
        if info and info.exe:
            attrs[PROCESS.PROCESS_EXECUTABLE_PATH] = info.exe
        cid = process.container_id(pid)
        if cid:
            attrs[CONTAINER.CONTAINER_ID] = cid
        return attrs


# --- proto building ---------------------------------------------------------------


def any_value(value: object) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, (list, tuple)):
        from opentelemetry.proto.common.v1.common_pb2 import ArrayValue
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def to_key_values(attrs: dict[str, object]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items() if v is not None]


_KV_CACHE: dict[tuple[str, type, object], KeyValue] = {}
_KV_CACHE_MAX = 8192  # bounded: query shapes are many; a few MB at most
# A client's port is new with nearly every connection: caching it would only churn the cache.
_KV_UNCACHED = frozenset({"client.port", "network.peer.port"})


def cached_key_values(attrs: dict[str, object]) -> list[KeyValue]:
    """KeyValues for span attributes, reusing messages for pairs seen before.

    Most span attributes repeat (system, database, query shape, ports): copying a
    ready KeyValue into a span costs a third of building a new one."""
    out = []
    cache = _KV_CACHE
    for k, v in attrs.items():
        if v is None:
            continue
        if k in _KV_UNCACHED or isinstance(v, (list, tuple, dict)):
            out.append(KeyValue(key=k, value=any_value(v)))
            continue
        key = (k, type(v), v)  # the type keeps True and 1 apart
        kv = cache.get(key)
        if kv is None:
            if len(cache) >= _KV_CACHE_MAX:
                cache.clear()
            kv = cache[key] = KeyValue(key=k, value=any_value(v))
        out.append(kv)
    return out


_rand = random.Random()


def new_ids() -> tuple[bytes, bytes]:
    bits = _rand.getrandbits(192)
    return (bits >> 64).to_bytes(16, "big"), (bits & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


def trace_request(spans: Iterable[SpanData], resources: ResourceCache) -> ExportTraceServiceRequest:
    """One request for a batch: spans grouped by the Resource of their process.

    Spans are built in place (`spans.add`): a Span made first and then handed to a
    ScopeSpans would be copied once more, which cost as much as building it."""
    request = ExportTraceServiceRequest()
    groups: dict[int, object] = {}  # pid -> the repeated `spans` field of its ScopeSpans
    for s in spans:
        if s.trace_id is None:
            s.trace_id, s.span_id = new_ids()
        group = groups.get(s.resource_pid)
        if group is None:
            resource_spans = request.resource_spans.add()
            resource_spans.resource.CopyFrom(resources.proto(s.resource_pid))
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.CopyFrom(SCOPE)
            group = groups[s.resource_pid] = scope_spans.spans
        span = group.add(trace_id=s.trace_id, span_id=s.span_id, name=s.name, kind=s.kind,
                         start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
                         attributes=cached_key_values(s.attributes))
        if s.error:
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = s.status_message
    return request


# --- exporters --------------------------------------------------------------------


class SpanSink(Protocol):
    def export(self, spans: list[SpanData]) -> bool: ...
    def shutdown(self) -> None: ...


class ConsoleSink:
    """One readable line per span: `postgresql   12.3 ms  SELECT orders  db=shop pid=4242`."""

    def __init__(self, resources: ResourceCache, stream: IO[str] | None = None,
                 slow_threshold_s: float | None = None):
        self._resources = resources
        self._stream = stream or sys.stdout
        self._slow = slow_threshold_s
        self._lock = threading.Lock()

    def export(self, spans: list[SpanData]) -> bool:
        lines = [self.format(s) for s in spans]
        with self._lock:
            self._stream.write("".join(lines))
            self._stream.flush()
        return True

    def format(self, s: SpanData) -> str:
        a = s.attributes
        system = a.get(DB.DB_SYSTEM_NAME) or a.get("url.scheme") or s.target
        ms = (s.end_ns - s.start_ns) / 1e6
        parts = [f"{system:<11}", f"{ms:8.1f} ms", f" {s.name}"]
        if "url.path" in a:
            parts.append(f" {a.get('server.address', '')}{a['url.path']}")
        if DB.DB_NAMESPACE in a:
            parts.append(f"  db={a[DB.DB_NAMESPACE]}")
        if "http.response.status_code" in a:
            parts.append(f"  status={a['http.response.status_code']}")
        parts.append(f"  pid={s.resource_pid}")
        if s.error:
            parts.append(f"  ERROR {s.status_message or a.get('error.type', '')}".rstrip())
        if self._slow is not None and s.duration_s >= self._slow:
            parts.append("  SLOW")
        return "".join(parts) + "\n"

    def shutdown(self) -> None:
        self._stream.flush()


class JsonlSink:
    """One JSON object per span, for scripts and tests."""

    def __init__(self, path: str, resources: ResourceCache):
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown
        self._resources = resources
        self._lock = threading.Lock()

    def export(self, spans: list[SpanData]) -> bool:
        rows = []
        for s in spans:
            if s.trace_id is None:
                s.trace_id, s.span_id = new_ids()
            trace_id, span_id = s.trace_id, s.span_id
            rows.append(json.dumps({
                "trace_id": trace_id.hex(), "span_id": span_id.hex(), "name": s.name, "kind": s.kind,
                "start_ns": s.start_ns, "end_ns": s.end_ns, "error": s.error,
                "status_message": s.status_message, "attributes": s.attributes,
                "resource": self._resources.attributes(s.resource_pid),
            }, default=str) + "\n")
        with self._lock:
            self._fh.write("".join(rows))
            self._fh.flush()
        return True

    def shutdown(self) -> None:
        self._fh.close()


def otlp_protocol(signal: str) -> str:
    value = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
             or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if value not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={value!r}: use grpc or http/protobuf")
    return value


class OtlpTransport:
    """Sends prebuilt OTLP requests through the SDK exporters (their settings and retries)."""

    def __init__(self, signal: str):
        self.signal = signal
        self.protocol = otlp_protocol(signal)
        if signal == "traces":
            if self.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as E
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as E
        elif signal == "metrics":
            if self.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as E
            else:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as E
        else:
            if self.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as E
            else:
                from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as E
        self._exporter = E()

    def send(self, request, count: int) -> bool:
        """Send one prebuilt Export*ServiceRequest; False when the backend refused or is down."""
        exporter = self._exporter
        if self.protocol == "grpc":
            # The gRPC mixin turns SDK objects into a request in _translate_data; ours is one already.
            exporter._translate_data = lambda data: data  # type: ignore[method-assign]
            exporter._count_data = lambda data: count  # type: ignore[method-assign]
            result = exporter._export(request)  # type: ignore[attr-defined]
            return getattr(result, "name", str(result)) == "SUCCESS"
        client = getattr(exporter, "_client", None)
        if client is not None and hasattr(client, "export"):
            return bool(client.export(request.SerializePartialToString()).success)
        response = exporter._export(request.SerializePartialToString())  # type: ignore[attr-defined]
        return bool(getattr(response, "ok", False))

    def shutdown(self) -> None:
        try:
            self._exporter.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            log.debug("exporter shutdown failed", exc_info=True)


class OtlpSpanSink:
    def __init__(self, resources: ResourceCache):
        self._resources = resources
        self._transport = OtlpTransport("traces")

    def export(self, spans: list[SpanData]) -> bool:
        return self._transport.send(trace_request(spans, self._resources), len(spans))

    def shutdown(self) -> None:
        self._transport.shutdown()


def slow_log_request(spans: Iterable[SpanData], resources: ResourceCache) -> ExportLogsServiceRequest:
    """One WARN log record per slow operation: a slow-query log without a trace backend."""
    groups: dict[int, list[LogRecord]] = {}
    for s in spans:
        a = s.attributes
        ms = (s.end_ns - s.start_ns) / 1e6
        what = a.get(DB.DB_QUERY_SUMMARY) or s.name
        attrs = {k: a[k] for k in (DB.DB_SYSTEM_NAME, DB.DB_NAMESPACE, DB.DB_QUERY_SUMMARY, DB.DB_QUERY_TEXT,
                                   "http.request.method", "url.path", "http.response.status_code") if k in a}
        attrs["otel_ebpf.duration_ms"] = round(ms, 3)
        attrs["process.pid"] = s.resource_pid
        groups.setdefault(s.resource_pid, []).append(LogRecord(
            time_unix_nano=s.end_ns, observed_time_unix_nano=s.end_ns,
            severity_number=SeverityNumber.SEVERITY_NUMBER_WARN, severity_text="WARN",
            body=AnyValue(string_value=f"slow operation: {what} took {ms:.1f} ms"),
            attributes=to_key_values(attrs), trace_id=s.trace_id or b"", span_id=s.span_id or b"",
            event_name="otel_ebpf.slow_operation",
        ))
    return ExportLogsServiceRequest(resource_logs=[
        ResourceLogs(resource=resources.proto(pid), scope_logs=[ScopeLogs(scope=SCOPE, log_records=records)])
        for pid, records in groups.items()
    ])


def make_span_sink(output: str, resources: ResourceCache, slow_threshold_s: float) -> SpanSink:
    if output == "console":
        return ConsoleSink(resources, slow_threshold_s=slow_threshold_s)
    if output == "otlp":
        return OtlpSpanSink(resources)
    if output.startswith("jsonl:"):
        return JsonlSink(output[len("jsonl:"):], resources)
    raise ValueError(f"unknown output {output!r}: use console, otlp or jsonl:PATH")
