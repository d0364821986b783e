"""Where each signal goes, as the configuration says: spans (otlp, console, jsonl, none),
metrics and slow-operation logs (otlp, console, none). OTLP settings (endpoints,
protocol, headers, TLS, timeouts) are the SDK exporters' own, from OTEL_EXPORTER_OTLP_*.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from typing import IO, Callable

from .config import Config
from .export import ConsoleSink, JsonlSink, OtlpSpanSink, OtlpTransport, slow_log_request
from .exportworker import Sink
from .metrics import MetricStore
from .resources import ResourceCache
from .targets.base import SpanData

log = logging.getLogger(__name__)


class Outputs:
    def __init__(self, config: Config, resources: ResourceCache, stream: IO[str] | None = None):
        self._resources = resources
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._transports: list[OtlpTransport] = []
        disabled = config.sdk_disabled
        out = "none" if disabled else config.output
        self.spans: Sink | None = None
        if out == "console":
            self.spans = ConsoleSink(resources, self._stream, slow_threshold_s=config.slow_threshold_s)
        elif out == "otlp":
            self.spans = OtlpSpanSink(resources)  # the export worker shuts it down
        elif out.startswith("jsonl:"):
            self.spans = JsonlSink(out[len("jsonl:"):], resources)
        self._metrics = self._transport("metrics", "none" if disabled else config.metrics_exporter)
        self._metrics_console = not disabled and config.metrics_exporter == "console"
        logs = "none" if disabled else config.logs_exporter
        self._logs = self._transport("logs", logs)
        self.logs: Callable[[list[SpanData]], None] | None = None
        if logs == "otlp":
            self.logs = self._send_logs
        elif logs == "console":
            self.logs = self._print_logs

    def _transport(self, signal: str, exporter: str) -> OtlpTransport | None:
        if exporter != "otlp":
            return None
        transport = OtlpTransport(signal)
        self._transports.append(transport)
        return transport

    def _send_logs(self, spans: list[SpanData]) -> None:
        assert self._logs is not None
        self._logs.send(slow_log_request(spans, self._resources), len(spans))

    def _print_logs(self, spans: list[SpanData]) -> None:
        lines = []
        for s in spans:
            what = s.attributes.get("db.query.summary") or s.name
            lines.append(f"WARN slow operation: {what} took {(s.end_ns - s.start_ns) / 1e6:.1f} ms "
                         f"(pid {s.resource_pid}, trace {s.trace_id.hex() if s.trace_id else '-'})\n")
        with self._lock:
            self._stream.write("".join(lines))
            self._stream.flush()

    def send_metrics(self, metrics: MetricStore, resource: dict[str, object]) -> None:
        """Export the metrics once, cumulative, as configured."""
        try:
            if self._metrics is not None:
                self._metrics.send(metrics.otlp_request(resource), 0)
            elif self._metrics_console:
                text = json.dumps(metrics.summary(), default=str)
                with self._lock:
                    self._stream.write(f"metrics {text}\n")
                    self._stream.flush()
        except Exception:  # noqa: BLE001 - a backend problem must not stop the agent
            log.exception("metric export failed")

    def shutdown(self) -> None:
        for transport in self._transports:
            transport.shutdown()
