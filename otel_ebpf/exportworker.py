"""The export worker: a bounded queue of kept spans, exported in batches on its own thread,
with the slow-operation log records beside them.

States: RUNNING until `stop()` is asked; then DRAINING (what is queued goes out, nothing
new is taken) and STOPPED once the queue is empty or the stop deadline passed. Every span
that does not make it is counted by reason (queue_full, export_failed, shutdown).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Protocol

from .targets.base import SpanData

log = logging.getLogger(__name__)

RUNNING, DRAINING, STOPPED = "running", "draining", "stopped"


class Sink(Protocol):
    def export(self, spans: list[SpanData]) -> bool: ...
    def shutdown(self) -> None: ...


class ExportWorker:
    def __init__(self, sink: Sink | None, queue_size: int, batch_size: int, delay_s: float,
                 send_logs: Callable[[list[SpanData]], None] | None = None,
                 observer: Callable[[list[SpanData]], None] | None = None):
        self.sink = sink
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.delay_s = delay_s
        self.send_logs = send_logs  # slow-operation log records (None: logs are not exported)
        self.observer = observer  # sees every exported batch (the demo's summary)
        self.state = RUNNING
        self.counts = collections.Counter[str]()
        self._queue: collections.deque[SpanData] = collections.deque()
        self._slow: list[SpanData] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # spans of the batch being exported

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> "ExportWorker":
        self._thread = threading.Thread(target=self._loop, name="otel-ebpf-export", daemon=True)
        self._thread.start()
        return self

    def put(self, spans: list[SpanData], slow: list[SpanData]) -> None:
        """Queue kept spans (and log their slow ones); beyond queue_size they are dropped."""
        with self._cv:
            if self.state != RUNNING:
                self.counts["spans.dropped.shutdown"] += len(spans)
                return
            if slow and self.send_logs is not None:
                if len(self._slow) < self.queue_size:
                    self._slow.extend(slow)
                else:
                    self.counts["logs.dropped.queue_full"] += len(slow)
            room = self.queue_size - len(self._queue)
            if room < len(spans):
                self.counts["spans.dropped.queue_full"] += len(spans) - max(room, 0)
                spans = spans[:max(room, 0)]
            self._queue.extend(spans)
            if len(self._queue) >= self.batch_size:
                self._cv.notify()

    def _take(self) -> tuple[list[SpanData], list[SpanData], bool]:
        with self._cv:
            if self.state == RUNNING and len(self._queue) < self.batch_size:
                self._cv.wait(self.delay_s)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch_size))]
            self._in_flight = len(batch)
            slow, self._slow = self._slow, []
            done = self.state != RUNNING and not self._queue
        return batch, slow, done

    def _loop(self) -> None:
        while True:
            batch, slow, done = self._take()
            if batch:
                self._export(batch)
            if slow and self.send_logs is not None:
                try:
                    self.send_logs(slow)
                except Exception:  # noqa: BLE001 - a backend problem must not stop the agent
                    log.exception("slow-operation log export failed")
            if done:
                return

    def _export(self, batch: list[SpanData]) -> None:
        ok = False
        if self.sink is not None:
            try:
                ok = self.sink.export(batch)
            except Exception:  # noqa: BLE001 - a backend problem must not stop the agent
                log.exception("span export failed")
        if self.observer is not None:
            self.observer(batch)
        with self._cv:
            if self.state == STOPPED:
                return  # stop() gave up waiting and counted this batch as lost at shutdown
            self._in_flight = 0
            if ok:
                self.counts["spans.exported"] += len(batch)
            else:
                self.counts["spans.dropped.export_failed"] += len(batch)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Export what is queued (up to `timeout_s`), then stop; what is left is counted."""
        with self._cv:
            if self.state == RUNNING:
                self.state = DRAINING
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cv:
            left = len(self._queue) + (self._in_flight if self._thread is not None and self._thread.is_alive() else 0)
            if left:
                self.counts["spans.dropped.shutdown"] += left
                self._queue.clear()
            self.state = STOPPED
        if self.sink is not None:
            self.sink.shutdown()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the queue is empty (tests, the demo); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._queue:
                return True
            time.sleep(0.02)
        return False
