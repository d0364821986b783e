"""An OTLP receiver for benchmarks: tests/support/otlp.py's real gRPC/HTTP receiver, counting
spans instead of keeping them (a benchmark sends millions; a soak must not measure the
receiver's memory), and keeping only the latest metrics and logs request."""
from __future__ import annotations

from tests.support.otlp import OtlpReceiver


class CountingReceiver(OtlpReceiver):
    def __init__(self) -> None:
        super().__init__()
        self.span_count = 0

    def _add(self, target: list, request) -> None:
        with self._lock:
            if target is self.trace_requests:
                self.span_count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            else:
                target[:] = [request]
            self._lock.notify_all()
