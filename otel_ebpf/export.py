"""Span exporters (console, JSON lines, OTLP), slow-operation log records, and the OTLP
transport shared by spans, metrics and logs.

OTLP spans are not built through the SDK's tracer: its per-span cost (about 137 µs
here) is too high for the hot path. Batches of SpanData become
`ExportTraceServiceRequest` messages directly and go out through the SDK's own
OTLP exporters (gRPC or http/protobuf), so endpoint, headers, timeout,
compression, TLS and retries still come from the standard OTEL_EXPORTER_OTLP_*
variables and the exporters' code.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import IO, Iterable, Protocol

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs, SeverityNumber
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.semconv.attributes import db_attributes as DB

from .protobuf import SCOPE, cached_key_values, to_key_values
from .resources import ResourceCache
from .targets.base import SpanData
from .tracecontext import new_ids

log = logging.getLogger(__name__)


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
        if s.parent_span_id:  # joined the application's trace (tracecontext.py)
            span.parent_span_id = s.parent_span_id
            span.flags = 0x100 | 0x200 | (s.trace_flags & 0xFF)  # has-is-remote, is-remote
            if s.trace_state:
                span.trace_state = s.trace_state
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


# --- OTLP transport: the one place that relies on the SDK exporters' internals ---------
#
# The SDK has no public way to send an Export*ServiceRequest that is already built: its
# exporters take SDK objects (ReadableSpan, MetricsData, log records) and encode them
# themselves. So that OTEL_EXPORTER_OTLP_* (endpoint, headers, TLS, compression, timeout)
# and the retries still come from the SDK, the transport uses the SDK exporters through
# the members below, and through nothing else private. SDK_INTERNALS lists them;
# tests/unit/test_export_fence.py checks every one against the installed SDK (present,
# same parameters) and sends real requests through both protocols to a receiver in the
# test, naming the installed SDK version when something moved. constraints.txt pins the
# SDK, so a rebuild cannot pick up a release the fence was not run against.

# (module, attribute path, parameters after self): what the transport relies on.
SDK_INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # gRPC: OTLPExporterMixin turns SDK data into a request in two abstract hooks its
    # subclasses implement; _PrebuiltGrpc implements them for a request built already and
    # calls the exporter's public export().
    ("opentelemetry.exporter.otlp.proto.grpc.exporter", "OTLPExporterMixin._translate_data", ("data",)),
    ("opentelemetry.exporter.otlp.proto.grpc.exporter", "OTLPExporterMixin._count_data", ("data",)),
    ("opentelemetry.exporter.otlp.proto.grpc.exporter", "OTLPExporterMixin._export", ("data",)),
    # http/protobuf: the exporter's HTTP client (compression, headers, retries) in `_client`.
    ("opentelemetry.exporter.otlp.common.http", "_OTLPHTTPClient.export", ("data",)),
    ("opentelemetry.exporter.otlp.common.http", "_ExportResult.success", ()),
    # The log exporters live in private modules (logs are still "development" in the SDK).
    ("opentelemetry.exporter.otlp.proto.grpc._log_exporter", "OTLPLogExporter", ()),
    ("opentelemetry.exporter.otlp.proto.http._log_exporter", "OTLPLogExporter", ()),
)

# (signal, protocol) -> the SDK exporter class that carries it.
SDK_EXPORTERS: dict[tuple[str, str], tuple[str, str]] = {
    ("traces", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter"),
    ("metrics", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter"),
    ("logs", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc._log_exporter", "OTLPLogExporter"),
    ("traces", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter"),
    ("metrics", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter"),
    ("logs", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http._log_exporter", "OTLPLogExporter"),
}

SDK_DISTRIBUTIONS = ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc",
                     "opentelemetry-exporter-otlp-proto-http")


def sdk_versions() -> str:
    """The installed SDK exporter versions, for messages: 'opentelemetry-sdk 1.45.1, ...'."""
    from importlib import metadata
    out = []
    for dist in SDK_DISTRIBUTIONS:
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


class SdkFenceError(RuntimeError):
    """The installed OpenTelemetry SDK lacks a member the OTLP transport relies on."""


class _Prebuilt:
    """A request built already, in the place of the SDK data an exporter would encode."""

    __slots__ = ("request", "count")

    def __init__(self, request: object, count: int):
        self.request, self.count = request, count

    def __len__(self) -> int:  # should an exporter count its input itself
        return self.count


def _prebuilt_grpc_exporter(base: type) -> type:
    """The SDK's gRPC exporter class, with the mixin's two hooks taking a _Prebuilt."""
    for hook in ("_translate_data", "_count_data", "_export"):
        if not callable(getattr(base, hook, None)):
            raise SdkFenceError(f"{base.__module__}.{base.__qualname__} has no {hook} "
                                f"({sdk_versions()}); otel-ebpf is tested with the versions in "
                                "constraints.txt")

    class PrebuiltRequestExporter(base):  # type: ignore[misc, valid-type]
        def _translate_data(self, data: _Prebuilt) -> object:
            return data.request

        def _count_data(self, data: _Prebuilt) -> int:
            return data.count

    PrebuiltRequestExporter.__qualname__ = PrebuiltRequestExporter.__name__ = f"Prebuilt{base.__name__}"
    return PrebuiltRequestExporter


class OtlpTransport:
    """Sends prebuilt OTLP requests through the SDK exporters (their settings and retries)."""

    def __init__(self, signal: str):
        import importlib

        self.signal = signal
        self.protocol = otlp_protocol(signal)
        module, name = SDK_EXPORTERS[(signal, self.protocol)]
        cls = getattr(importlib.import_module(module), name)
        if self.protocol == "grpc":
            self._exporter = _prebuilt_grpc_exporter(cls)()
            self._http_client = None
        else:
            self._exporter = cls()
            self._http_client = getattr(self._exporter, "_client", None)
            if not callable(getattr(self._http_client, "export", None)):
                raise SdkFenceError(f"{module}.{name} has no _client.export ({sdk_versions()}); "
                                    "otel-ebpf is tested with the versions in constraints.txt")

    def send(self, request, count: int) -> bool:
        """Send one prebuilt Export*ServiceRequest; False when the backend refused or is down."""
        if self._http_client is None:
            result = self._exporter.export(_Prebuilt(request, count))
            return getattr(result, "name", "") == "SUCCESS"
        return bool(self._http_client.export(request.SerializePartialToString()).success)

    def shutdown(self) -> None:
        try:
            self._exporter.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            log.debug("exporter shutdown failed", exc_info=True)


# --- end of the SDK fence --------------------------------------------------------------


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
