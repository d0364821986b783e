"""The OTLP transport's dependence on OpenTelemetry SDK internals, fenced.

otel_ebpf.export.OtlpTransport sends requests it built itself through the SDK's OTLP
exporters, which have no public way to take one. Every private member it relies on is
listed in export.SDK_INTERNALS; these tests fail, naming the installed SDK versions,
when one of them is gone or takes other parameters, and send real requests through
both protocols (gRPC and http/protobuf) to receivers started here, checking that
each arrives intact with the SDK's headers and compression applied.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import re
import threading
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from otel_ebpf import export

EXPORT_PY = Path(export.__file__)
HEADER = ("x-otel-ebpf-fence", "checked")


def versions() -> str:
    return export.sdk_versions()


def resolve(module: str, path: str):
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is gone from the installed SDK ({versions()}): {exc}. "
                    "Update otel_ebpf/export.py's SDK fence or pin the SDK in constraints.txt.")
    for part in path.split("."):
        if not hasattr(obj, part):
            pytest.fail(f"{module}.{path} is gone from the installed SDK ({versions()}): "
                        "otel_ebpf/export.py's OtlpTransport relies on it. Update the fence "
                        "(SDK_INTERNALS and OtlpTransport) or pin the SDK in constraints.txt.")
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------- the members relied on


@pytest.mark.parametrize("module,path,params", export.SDK_INTERNALS,
                         ids=[f"{m.rsplit('.', 1)[-1]}:{p}" for m, p, _ in export.SDK_INTERNALS])
def test_sdk_member_is_there_with_the_same_parameters(module, path, params):
    member = resolve(module, path)
    if not params:
        return
    sig = inspect.signature(member)
    names = tuple(p for p in sig.parameters if p != "self")
    assert names == params, (
        f"{module}.{path}{sig} changed in the installed SDK ({versions()}): otel_ebpf/export.py "
        f"calls it as ({', '.join(params)}). Update the fence or pin the SDK in constraints.txt.")


def test_grpc_hooks_are_still_the_mixins_abstract_hooks():
    mixin = resolve("opentelemetry.exporter.otlp.proto.grpc.exporter", "OTLPExporterMixin")
    hooks = {"_translate_data", "_count_data"}
    assert hooks <= set(getattr(mixin, "__abstractmethods__", ())), (
        f"OTLPExporterMixin no longer declares {hooks} as the hooks its subclasses implement "
        f"({versions()}): the gRPC transport's subclass would not be called.")


@pytest.mark.parametrize("signal,protocol", sorted(export.SDK_EXPORTERS))
def test_every_sdk_exporter_the_transport_uses_has_the_expected_shape(signal, protocol, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    module, name = export.SDK_EXPORTERS[(signal, protocol)]
    cls = resolve(module, name)
    if protocol == "grpc":
        mixin = resolve("opentelemetry.exporter.otlp.proto.grpc.exporter", "OTLPExporterMixin")
        assert issubclass(cls, mixin), f"{module}.{name} is no OTLPExporterMixin ({versions()})"
        params = [p for p in inspect.signature(cls.export).parameters.values() if p.name != "self"]
        assert params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD), (
            f"{module}.{name}.export no longer takes the data as its first argument ({versions()})")
    else:
        client_cls = resolve("opentelemetry.exporter.otlp.common.http", "_OTLPHTTPClient")
        exporter = cls()
        try:
            assert isinstance(getattr(exporter, "_client", None), client_cls), (
                f"{module}.{name}() keeps no _OTLPHTTPClient in _client ({versions()})")
        finally:
            exporter.shutdown()


def test_private_sdk_members_are_used_inside_the_fence_only():
    text = EXPORT_PY.read_text()
    start = text.index("# --- OTLP transport: the one place")
    end = text.index("# --- end of the SDK fence")
    outside = text[:start] + text[end:]
    for member in ("_export", "_translate_data", "_count_data", "_client", "_log_exporter",
                   "_OTLPHTTPClient", "_ExportResult"):
        assert not re.search(rf"\.{member}\b|\b{member}\b\s*\(", outside), (
            f"{member} is used outside the SDK fence in {EXPORT_PY}")
    for _module, path, _params in export.SDK_INTERNALS:
        assert path.rsplit(".", 1)[-1] in text[start:end]


# ---------------------------------------------------------------- requests


def trace_request() -> trace_service_pb2.ExportTraceServiceRequest:
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="fence"))]),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name="otel-ebpf"), spans=[Span(
            trace_id=bytes(range(16)), span_id=bytes(range(8)), name="SELECT orders", kind=2,
            start_time_unix_nano=1_000, end_time_unix_nano=2_000,
            attributes=[KeyValue(key="db.query.text", value=AnyValue(string_value='SELECT "é" \n'))])])])])


def metrics_request() -> metrics_service_pb2.ExportMetricsServiceRequest:
    cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    return metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
        resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="fence"))]),
        scope_metrics=[ScopeMetrics(scope=InstrumentationScope(name="otel-ebpf"), metrics=[
            Metric(name="db.server.operation.duration", unit="s", histogram=Histogram(
                aggregation_temporality=cumulative, data_points=[HistogramDataPoint(
                    count=3, sum=0.5, bucket_counts=[1, 2, 0], explicit_bounds=[0.1, 1.0],
                    time_unix_nano=5)])),
            Metric(name="otel_ebpf.events", unit="{event}", sum=Sum(
                aggregation_temporality=cumulative, is_monotonic=True,
                data_points=[NumberDataPoint(as_int=42, time_unix_nano=5)])),
        ])])])


def logs_request() -> logs_service_pb2.ExportLogsServiceRequest:
    return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="fence"))]),
        scope_logs=[ScopeLogs(scope=InstrumentationScope(name="otel-ebpf"), log_records=[LogRecord(
            time_unix_nano=7, severity_text="WARN", body=AnyValue(string_value="slow operation"),
            trace_id=bytes(range(16)), span_id=bytes(range(8)))])])])


REQUESTS = {"traces": trace_request, "metrics": metrics_request, "logs": logs_request}


def configure(monkeypatch, endpoint: str, protocol: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"{HEADER[0]}={HEADER[1]}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")
    for signal in REQUESTS:
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", raising=False)
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", raising=False)


# ---------------------------------------------------------------- gRPC receiver


class GrpcReceiver:
    def __init__(self, refuse: bool = False):
        self.received: dict[str, list] = {"traces": [], "metrics": [], "logs": []}
        self.metadata: list[dict] = []
        receiver = self

        def handler(signal, response):
            def export(self, request, context):
                receiver.metadata.append(dict(context.invocation_metadata()))
                if refuse:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the test")
                receiver.received[signal].append(request)
                return response()
            return export

        traces = type("T", (trace_service_pb2_grpc.TraceServiceServicer,), {
            "Export": handler("traces", trace_service_pb2.ExportTraceServiceResponse)})
        metrics = type("M", (metrics_service_pb2_grpc.MetricsServiceServicer,), {
            "Export": handler("metrics", metrics_service_pb2.ExportMetricsServiceResponse)})
        logs = type("L", (logs_service_pb2_grpc.LogsServiceServicer,), {
            "Export": handler("logs", logs_service_pb2.ExportLogsServiceResponse)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics(), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(logs(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def grpc_receiver():
    receivers = []

    def start(refuse=False):
        receivers.append(GrpcReceiver(refuse))
        return receivers[-1]

    yield start
    for r in receivers:
        r.stop()


@pytest.mark.parametrize("signal", sorted(REQUESTS))
def test_grpc_transport_delivers_the_request_intact(signal, grpc_receiver, monkeypatch):
    receiver = grpc_receiver()
    configure(monkeypatch, f"http://127.0.0.1:{receiver.port}", "grpc")
    transport = export.OtlpTransport(signal)
    sent = REQUESTS[signal]()
    try:
        assert transport.send(sent, 1), f"gRPC {signal} export failed ({versions()})"
    finally:
        transport.shutdown()
    assert receiver.received[signal] == [sent], f"{signal}: the receiver got another request"
    assert receiver.metadata[-1].get(HEADER[0]) == HEADER[1], "OTEL_EXPORTER_OTLP_HEADERS not applied"
    # Sent by the SDK's exporter, not by something of ours beside it.
    assert receiver.metadata[-1].get("user-agent", "").startswith("OTel-OTLP-Exporter-Python")


def test_grpc_transport_reports_a_refusal(grpc_receiver, monkeypatch):
    receiver = grpc_receiver(refuse=True)
    configure(monkeypatch, f"http://127.0.0.1:{receiver.port}", "grpc")
    transport = export.OtlpTransport("traces")
    try:
        assert transport.send(trace_request(), 1) is False
    finally:
        transport.shutdown()


# ---------------------------------------------------------------- HTTP receiver


class HttpReceiver:
    PATHS = {"/v1/traces": ("traces", trace_service_pb2.ExportTraceServiceRequest,
                            trace_service_pb2.ExportTraceServiceResponse),
             "/v1/metrics": ("metrics", metrics_service_pb2.ExportMetricsServiceRequest,
                             metrics_service_pb2.ExportMetricsServiceResponse),
             "/v1/logs": ("logs", logs_service_pb2.ExportLogsServiceRequest,
                          logs_service_pb2.ExportLogsServiceResponse)}

    def __init__(self, status: int = 200):
        self.received: dict[str, list] = {"traces": [], "metrics": [], "logs": []}
        self.headers: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                signal, request_cls, response_cls = receiver.PATHS[self.path]
                if status == 200:
                    receiver.received[signal].append(request_cls.FromString(body))
                data = response_cls().SerializeToString() if status == 200 else b"refused"
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_receiver():
    receivers = []

    def start(status=200):
        receivers.append(HttpReceiver(status))
        return receivers[-1]

    yield start
    for r in receivers:
        r.stop()


@pytest.mark.parametrize("signal", sorted(REQUESTS))
def test_http_transport_delivers_the_request_intact(signal, http_receiver, monkeypatch):
    receiver = http_receiver()
    configure(monkeypatch, f"http://127.0.0.1:{receiver.port}", "http/protobuf")
    transport = export.OtlpTransport(signal)
    sent = REQUESTS[signal]()
    try:
        assert transport.send(sent, 1), f"http/protobuf {signal} export failed ({versions()})"
    finally:
        transport.shutdown()
    assert receiver.received[signal] == [sent], f"{signal}: the receiver got another request"
    headers = receiver.headers[-1]
    assert headers.get(HEADER[0]) == HEADER[1], "OTEL_EXPORTER_OTLP_HEADERS not applied"
    assert headers.get("content-encoding") == "gzip", "OTEL_EXPORTER_OTLP_COMPRESSION not applied"
    assert headers.get("content-type") == "application/x-protobuf"
    assert headers.get("user-agent", "").startswith("OTel-OTLP-Exporter-Python")


def test_http_transport_reports_a_refusal(http_receiver, monkeypatch):
    receiver = http_receiver(status=400)  # not retryable: answered at once
    configure(monkeypatch, f"http://127.0.0.1:{receiver.port}", "http/protobuf")
    transport = export.OtlpTransport("metrics")
    try:
        assert transport.send(metrics_request(), 0) is False
    finally:
        transport.shutdown()
    assert receiver.headers, "the request never reached the receiver"
