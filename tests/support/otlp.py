"""An OTLP receiver for tests: real gRPC and http/protobuf endpoints, nothing mocked.

It keeps every request it receives, decoded, so that tests can assert on exactly
what the agent exported (spans with their Resource, metrics, logs).
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value_of(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs_of(kvs) -> dict[str, object]:
    return {kv.key: value_of(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    resource: dict[str, object]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes = b""
    flags: int = 0

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class OtlpReceiver:
    def __init__(self, fail_first: int = 0):
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.log_requests: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self._lock = threading.Condition()
        self.available = True  # False: answer UNAVAILABLE / 503, as a backend that is down
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802
                if not receiver.available:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
                receiver._add(receiver.trace_requests, request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                if not receiver.available:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
                receiver._add(receiver.metric_requests, request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                receiver._add(receiver.log_requests, request)
                return logs_service_pb2.ExportLogsServiceResponse()

        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.grpc_server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.grpc_server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self.grpc_server)
        self.grpc_port = self.grpc_server.add_insecure_port("127.0.0.1:0")

        class Http(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not receiver.available:
                    self.send_response(503)
                    self.end_headers()
                    return
                kinds = {"/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, receiver.trace_requests),
                         "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, receiver.metric_requests),
                         "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest, receiver.log_requests)}
                if self.path not in kinds:
                    self.send_response(404)
                    self.end_headers()
                    return
                cls, target = kinds[self.path]
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip
                    body = gzip.decompress(body)
                receiver._add(target, cls.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.http_server = ThreadingHTTPServer(("127.0.0.1", 0), Http)
        self.http_port = self.http_server.server_address[1]

    def _add(self, target: list, request) -> None:
        with self._lock:
            target.append(request)
            self._lock.notify_all()

    def start(self) -> "OtlpReceiver":
        self.grpc_server.start()
        threading.Thread(target=self.http_server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.grpc_server.stop(0)
        self.http_server.shutdown()
        self.http_server.server_close()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def spans(self) -> list[ReceivedSpan]:
        out = []
        with self._lock:
            requests = list(self.trace_requests)
        for req in requests:
            for rs in req.resource_spans:
                resource = attrs_of(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(ReceivedSpan(s.name, s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                                                attrs_of(s.attributes), resource, s.status.code,
                                                s.status.message, s.trace_id, s.span_id, s.parent_span_id,
                                                s.flags))
        return out

    def wait_for_spans(self, predicate, count: int, timeout: float = 20.0) -> list[ReceivedSpan]:
        """Spans matching predicate once there are at least `count` (or what came by the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [s for s in self.spans() if predicate(s)]
            remaining = deadline - time.monotonic()
            if len(matching) >= count or remaining <= 0:
                return matching
            with self._lock:
                self._lock.wait(min(remaining, 0.2))

    def metric_points(self, name: str) -> list[tuple[dict, object, dict]]:
        """(resource, data point, attributes) for every point of a metric, in arrival order."""
        out = []
        with self._lock:
            requests = list(self.metric_requests)
        for req in requests:
            for rm in req.resource_metrics:
                resource = attrs_of(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != name:
                            continue
                        data = getattr(m, m.WhichOneof("data"))
                        for p in data.data_points:
                            out.append((resource, p, attrs_of(p.attributes)))
        return out

    def last_points(self, name: str, **match: object) -> dict[tuple, object]:
        """The latest point of each series of a cumulative metric (it counts everything so far)."""
        last: dict[tuple, object] = {}
        for _resource, point, attrs in self.metric_points(name):
            if all(attrs.get(k) == v for k, v in match.items()):
                last[tuple(sorted(attrs.items()))] = point
        return last

    def counter_total(self, name: str, **match: object) -> float:
        return sum(p.as_int or p.as_double for p in self.last_points(name, **match).values())

    def db_duration_counts(self, system: str | None = None) -> dict[tuple[str, str | None], int]:
        """Operations counted by db.server.operation.duration, by (db.operation.name, error.type)."""
        match = {"db.system.name": system} if system else {}
        out: dict[tuple[str, str | None], int] = {}
        for key, point in self.last_points("db.server.operation.duration", **match).items():
            attrs = dict(key)
            k = (attrs["db.operation.name"], attrs.get("error.type"))
            out[k] = out.get(k, 0) + point.count
        return out

    def all_exported_text(self) -> str:
        """Every string the agent sent, for 'this secret appears nowhere' assertions."""
        with self._lock:
            blobs = [r.SerializeToString() for r in self.trace_requests + self.metric_requests + self.log_requests]
        return b"\n".join(blobs).decode("utf-8", "replace")
