"""The running agent: attach targets, drain ring buffers, build spans, export, report health.

Threads: the main loop (discovery, draining, decoding), one export thread (the
span queue, bounded), one metrics thread, and the health/Prometheus HTTP server.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import bpf, process
from .discovery import find_binaries
from .config import Config
from .elf import ElfError
from .export import OtlpTransport, ResourceCache, SpanSink, make_span_sink, new_ids, slow_log_request
from .metrics import MetricStore
from .targets import registry
from .targets.base import (
    STAT_EVENTS, STAT_LOST, STAT_MAX, STAT_OPERATIONS, STAT_SAMPLED_OUT, STAT_UNMATCHED, DecodeContext, SpanData, Target,
)

log = logging.getLogger(__name__)
EXPIRY_INTERVAL_S = 5.0  # how often in-flight starts of vanished threads are dropped
RATE_WINDOW_S = 0.25  # the span rate limit looks at the operation rate this often
IDLE_DRAIN_S = 0.1  # the longest wait between drains while nothing comes


def next_drain_wait(records: int, wait_s: float, busy_wait_s: float) -> float:
    """Seconds until the next drain: `busy_wait_s` while records come; after a drain that
    found none the wait doubles, up to IDLE_DRAIN_S (an idle agent wakes less often; the
    ring buffer holds that long at thousands of records/s)."""
    if records:
        return busy_wait_s
    return min(wait_s * 2, max(IDLE_DRAIN_S, busy_wait_s))


def span_interval_ns(max_spans_per_second: int) -> int:
    """The kernel's span budget per target (probes/common.h within_budget): one span every
    this many ns beyond bursts; 0 = no budget. The agent's adaptive ratio shares the limit
    between operations evenly; the budget caps a burst before that ratio has seen it."""
    return 1_000_000_000 // max_spans_per_second if max_spans_per_second > 0 else 0


def mono_to_epoch_offset() -> int:
    """Nanoseconds to add to CLOCK_MONOTONIC (bpf_ktime_get_ns) to get Unix time."""
    best = None
    for _ in range(5):
        a = time.monotonic_ns()
        wall = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, wall - (a + b) // 2)
    assert best is not None
    return best[1]


@dataclass
class Unit:
    """One target attached to one binary file."""

    target: Target
    path: str
    file_id: process.FileId
    program: bpf.Program | None = None
    labels: list[str] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    stats: list[int] = field(default_factory=lambda: [0] * STAT_MAX)
    ringbuf_peak: float = 0.0  # highest fill seen at a drain since the last metrics read


class Agent:
    def __init__(self, config: Config, span_observer=None):
        self.config = config
        self.span_observer = span_observer  # called with each exported batch (the demo's summary)
        self.targets: list[Target] = [registry.create(n) for n in (config.targets or registry.available())]
        self.units: dict[tuple[str, process.FileId], Unit] = {}
        self.resources = ResourceCache()
        self.metrics = MetricStore()
        self.ctx = DecodeContext(mono_to_epoch_offset(), config)
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._queue: collections.deque[SpanData] = collections.deque()
        self._queue_cv = threading.Condition()
        self._sink: SpanSink | None = None
        self._metric_transport: OtlpTransport | None = None
        self._log_transport: OtlpTransport | None = None
        self._slow_logs: list[SpanData] = []
        self._server: ThreadingHTTPServer | None = None
        self._prom_server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._last_scan = 0.0
        self._warned: set[str] = set()  # warnings said once (a missing binary at every rescan)
        self.counts = collections.Counter[str]()  # spans.exported, spans.dropped.<reason>, ...
        self.sampling_permille = round(config.sample_ratio * 1000)  # in force, after rate limiting
        self._ops_seen = (0, time.monotonic())

    # --- discovery and attach ------------------------------------------------

    def discover(self) -> list[tuple[Target, str, process.FileId]]:
        """Binaries of the enabled targets (see discovery.find_binaries)."""
        return find_binaries(self.targets, self.config.binaries, self._warn_once)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def attach_new(self) -> None:
        compiled = False
        for target, path, fid in self.discover():
            key = (target.name, fid)
            if key in self.units:
                continue
            compiled = True
            unit = Unit(target, path, fid)
            self.units[key] = unit
            try:
                plan = target.plan(path, self.config)
                unit.notes = plan.notes
                cflags = [*plan.cflags, f"-DRINGBUF_PAGES={self.config.ringbuf_pages}",
                          f"-DSAMPLE_PERMILLE={round(self.config.sample_ratio * 1000)}",
                          f"-DSLOW_NS={int(self.config.slow_threshold_ms * 1_000_000)}ULL",
                          f"-DSPAN_INTERVAL_NS={span_interval_ns(self.config.max_spans_per_second)}ULL"]
                program = bpf.compile_program(f"{target.name}:{path}", target.c_file, cflags)
                unit.program = program
                if target.kernel_histograms:
                    program.set_array_value("sampling", 0, self.sampling_permille + 1)
                for spec in plan.attach:
                    program.attach_uprobe(spec.fn_name, path, spec.offset, retprobe=spec.retprobe,
                                          ref_ctr_offset=spec.ref_ctr_offset, label=spec.label)
                    unit.labels.append(spec.label)
                program.open_ring_buffer()
                log.info("%s: attached %d probes to %s", target.name, len(unit.labels), path)
                for note in plan.notes:
                    log.info("%s: %s", target.name, note)
            except (ElfError, bpf.BpfError, OSError) as exc:
                unit.error = str(exc)
                log.warning("%s: cannot attach to %s: %s", target.name, path, exc)
                if unit.program is not None:
                    unit.program.close()
                    unit.program = None
                unit.labels.clear()
        if compiled:
            released = bpf.release_compiler_memory()
            log.debug("released %.0f MB of compiler pages", released / 2**20)

    # --- running ----------------------------------------------------------------

    def start(self) -> None:
        self._sink = make_span_sink(self.config.output, self.resources, self.config.slow_threshold_s)
        if self.config.output == "otlp":
            self._metric_transport = OtlpTransport("metrics")
            self._log_transport = OtlpTransport("logs")
        self._server = self._serve(self.config.health_addr, self._health_response)
        if self.config.prometheus_addr:
            self._prom_server = self._serve(self.config.prometheus_addr, self._prometheus_response)
        for fn, name in ((self._export_loop, "export"), (self._metrics_loop, "metrics")):
            t = threading.Thread(target=fn, name=f"otel-ebpf-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        stale = bpf.remove_stale_events()
        if stale:
            log.info("removed %d uprobe events left by agents that were killed", stale)
        self.attach_new()
        self._last_scan = time.monotonic()
        self.ready.set()

    def run(self) -> None:
        """Drain until stop_event is set, then shut down cleanly."""
        self.start()
        try:
            busy_wait_s = self.config.drain_interval_ms / 1000.0
            wait_s = busy_wait_s
            while not self.stop_event.is_set():
                records = self.poll_once()
                self.check_span_rate()
                if time.monotonic() - self._last_scan > self.config.rescan_interval_s:
                    self._last_scan = time.monotonic()
                    self.attach_new()
                    self.resources.forget_exited()
                wait_s = next_drain_wait(records, wait_s, busy_wait_s)
                self.stop_event.wait(wait_s)
        finally:
            self.shutdown()

    def poll_once(self, final: bool = False) -> int:
        """Drain every ring buffer, decode, account; returns the records drained."""
        records = 0
        spans: list[SpanData] = []
        for unit in list(self.units.values()):
            if unit.program is None:
                continue
            raws = unit.program.drain()
            records += len(raws)
            if raws:
                # What one drain found is a lower bound of how full the ring buffer got.
                fill = (sum(len(r) for r in raws) + 8 * len(raws)) / (self.config.ringbuf_pages * 4096)
                unit.ringbuf_peak = max(unit.ringbuf_peak, min(fill, 1.0))
                try:
                    spans.extend(unit.target.decode(raws, self.ctx))
                except Exception:  # noqa: BLE001 - a decoding bug must not stop the agent
                    log.exception("%s: decoding %d records failed", unit.target.name, len(raws))
                    self.counts["spans.dropped.decode_error"] += len(raws)
        for target in self.targets:
            spans.extend(target.flush(time.monotonic_ns(), self.ctx, final=final))
        if spans:
            self._account(spans)
        return records

    def _account(self, spans: list[SpanData]) -> None:
        """Metrics for every operation, then sampling, then the export queue."""
        slow = self.config.slow_threshold_s
        ratio = self.sampling_permille / 1000
        # Read each process's Resource now, while it runs: a short-lived client may be gone
        # by the time its batch is exported.
        for pid in {s.resource_pid for s in spans}:
            self.resources.proto(pid)
        keep: list[SpanData] = []
        slow_spans: list[SpanData] = []
        for s in spans:
            target = registry.get(s.target)
            duration = s.duration_s
            metric, names = target.metric_of(s)
            attrs = {k: s.attributes.get(k) for k in names}
            if not target.kernel_histograms:
                self.metrics.record_duration(metric, attrs, duration)
            is_slow = duration >= slow
            if is_slow and "db.system.name" in s.attributes:
                self.metrics.add("otel_ebpf.db.slow_operations", {
                    "db.system.name": s.attributes.get("db.system.name"),
                    "db.query.summary": s.attributes.get("db.query.summary", ""),
                    "db.namespace": s.attributes.get("db.namespace", ""),
                })
            if (ratio < 1.0 and not target.kernel_histograms and not s.error and not is_slow
                    and random.random() >= ratio):
                self.counts["spans.sampled_out"] += 1
                continue
            s.trace_id, s.span_id = new_ids()
            self.metrics.set_exemplar(metric, attrs, duration, s.end_ns, s.trace_id, s.span_id)
            if is_slow:
                slow_spans.append(s)
            keep.append(s)
        if slow_spans and self._log_transport is not None:
            with self._queue_cv:
                if len(self._slow_logs) < self.config.queue_size:
                    self._slow_logs.extend(slow_spans)
                else:
                    self.counts["logs.dropped.queue_full"] += len(slow_spans)
        with self._queue_cv:
            room = self.config.queue_size - len(self._queue)
            if room < len(keep):
                self.counts["spans.dropped.queue_full"] += len(keep) - max(room, 0)
                keep = keep[:max(room, 0)]
            self._queue.extend(keep)
            if len(self._queue) >= self.config.batch_size:
                self._queue_cv.notify()

    def _export_loop(self) -> None:
        delay = self.config.export_delay_ms / 1000.0
        while True:
            with self._queue_cv:
                if not self._queue and not self.stop_event.is_set():
                    self._queue_cv.wait(delay)
                elif len(self._queue) < self.config.batch_size and not self.stop_event.is_set():
                    self._queue_cv.wait(delay)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.config.batch_size))]
                slow, self._slow_logs = self._slow_logs, []
                done = self.stop_event.is_set() and not self._queue
            if batch:
                self._export_batch(batch)
            if slow and self._log_transport is not None:
                try:
                    self._log_transport.send(slow_log_request(slow, self.resources), len(slow))
                except Exception:  # noqa: BLE001
                    log.exception("slow-operation log export failed")
            if done and getattr(self, "_export_final", False):
                return

    def _export_batch(self, batch: list[SpanData]) -> None:
        assert self._sink is not None
        try:
            ok = self._sink.export(batch)
        except Exception:  # noqa: BLE001 - a backend problem must not stop the agent
            log.exception("span export failed")
            ok = False
        if self.span_observer is not None:
            self.span_observer(batch)
        if ok:
            self.counts["spans.exported"] += len(batch)
        else:
            self.counts["spans.dropped.export_failed"] += len(batch)

    def expire_inflight(self) -> int:
        """Drop in-flight starts of threads that exited mid-operation; count them as unmatched."""
        expired = 0
        for unit in list(self.units.values()):
            if unit.program is None or not unit.target.inflight_keyed_by_tid:
                continue
            try:
                gone = [k for k, _v in unit.program.table_items("inflight")
                        if not os.path.exists(f"/proc/{k.value}")]
                expired += unit.program.table_delete("inflight", gone)
            except Exception:  # noqa: BLE001 - racing shutdown
                log.debug("expiring in-flight entries of %s failed", unit.path, exc_info=True)
        self.counts["starts.expired"] += expired
        return expired

    def _metrics_loop(self) -> None:
        interval = self.config.metric_interval_ms / 1000.0
        next_export = time.monotonic() + interval
        next_expiry = time.monotonic() + EXPIRY_INTERVAL_S
        while not self.stop_event.wait(1.0):
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRY_INTERVAL_S
                self.expire_inflight()
            self.read_stats()
            if time.monotonic() >= next_export:
                next_export = time.monotonic() + interval
                self.export_metrics()

    def read_stats(self) -> None:
        totals = collections.Counter[str]()
        ringbuf: dict[str, float] = {}
        attached = failed = 0
        for unit in list(self.units.values()):
            if unit.program is not None:
                try:
                    unit.stats = unit.program.percpu_sum("stats", STAT_MAX)
                except Exception:  # noqa: BLE001 - map read during shutdown
                    pass
                attached += len(unit.labels)
            elif unit.error:
                failed += 1
            name = unit.target.name
            ringbuf[name] = max(ringbuf.get(name, 0.0), unit.ringbuf_peak)
            unit.ringbuf_peak = 0.0
            for key, index in (("otel_ebpf.events", STAT_EVENTS), ("otel_ebpf.events.lost", STAT_LOST),
                               ("otel_ebpf.spans.sampled_out", STAT_SAMPLED_OUT),
                               ("otel_ebpf.starts.unmatched", STAT_UNMATCHED),
                               ("otel_ebpf.operations", STAT_OPERATIONS)):
                totals[(key, name)] += unit.stats[index]
        self._read_kernel_histograms()
        m = self.metrics
        m.set_gauge("otel_ebpf.sampling.ratio", {}, self.sampling_permille / 1000)
        for (key, name), value in totals.items():
            m.set_counter(key, {"target": name}, value)
        m.set_counter("otel_ebpf.starts.expired", {}, self.counts["starts.expired"])
        for target in self.targets:
            for reason, value in target.counters().items():
                m.set_counter("otel_ebpf.target.counts", {"target": target.name, "reason": reason}, value)
        for name, fill in ringbuf.items():
            m.set_gauge("otel_ebpf.ringbuf.usage", {"target": name}, fill)
        m.set_gauge("otel_ebpf.probes.attached", {}, attached)
        m.set_gauge("otel_ebpf.probes.failed", {}, failed)
        m.set_counter("otel_ebpf.spans.exported", {}, self.counts["spans.exported"])
        for reason in ("queue_full", "export_failed", "decode_error"):
            m.set_counter("otel_ebpf.spans.dropped", {"reason": reason}, self.counts[f"spans.dropped.{reason}"])

    def check_span_rate(self) -> None:
        """Called from the drain loop a few times a second: the limit reacts to a burst quickly."""
        if not self.config.max_spans_per_second or time.monotonic() - self._ops_seen[1] < RATE_WINDOW_S:
            return  # the per-CPU counters are read once a window, not on every drain
        operations = 0
        for unit in list(self.units.values()):
            if unit.program is not None and unit.target.kernel_histograms:
                try:
                    operations += unit.program.percpu_value("stats", STAT_OPERATIONS)
                except Exception:  # noqa: BLE001 - racing shutdown
                    pass
        self._limit_span_rate(operations)

    def _limit_span_rate(self, operations: int) -> None:
        """Lower the kernel's sampling ratio while operations exceed max_spans_per_second.

        The watched server pays the probes either way; what the limit bounds is the agent's
        own CPU (decoding and exporting spans), which on a busy host competes with the
        server. Slow and failed operations are always kept and the histograms stay exact."""
        previous, since = self._ops_seen  # check_span_rate calls once a window has passed
        now = time.monotonic()
        self._ops_seen = (operations, now)
        base = round(self.config.sample_ratio * 1000)
        limit = self.config.max_spans_per_second
        rate = max(operations - previous, 0) / (now - since)
        permille = base
        if limit and rate * base / 1000 > limit:
            permille = max(1, min(base, int(1000 * limit / rate)))
        if permille == self.sampling_permille:
            return
        crossing = (permille < base) != (self.sampling_permille < base)
        log.log(logging.INFO if crossing else logging.DEBUG,
                "span rate limit %d/s: %.0f operations/s, sampling %.1f %%", limit, rate, permille / 10)
        self.sampling_permille = permille
        for unit in list(self.units.values()):
            if unit.program is not None and unit.target.kernel_histograms:
                try:
                    unit.program.set_array_value("sampling", 0, permille + 1)
                except Exception:  # noqa: BLE001 - racing shutdown
                    log.debug("setting sampling of %s failed", unit.path, exc_info=True)

    def _read_kernel_histograms(self) -> None:
        """Cumulative duration histograms from every program's `hist` maps, summed per target."""
        nbuckets = len(self.metrics.buckets) + 1
        per_target: dict[str, dict[int, list]] = {}
        for unit in list(self.units.values()):
            if unit.program is None or not unit.target.kernel_histograms:
                continue
            dims = per_target.setdefault(unit.target.name, {})
            try:
                for key, value in unit.program.table_items("hist"):
                    entry = dims.setdefault(key.dim, [[0] * nbuckets, 0])
                    if key.bucket < nbuckets:
                        entry[0][key.bucket] += value.value
                for key, value in unit.program.table_items("hist_sum"):
                    entry = dims.setdefault(key.value, [[0] * nbuckets, 0])
                    entry[1] += value.value
            except Exception:  # noqa: BLE001 - a map read racing shutdown
                log.debug("reading histograms of %s failed", unit.path, exc_info=True)
        for name, dims in per_target.items():
            target = registry.get(name)
            merged: dict[tuple, list] = {}  # several dims may map to the same attributes
            for dim, (counts, total_ns) in dims.items():
                attrs = target.hist_attributes(dim)
                entry = merged.setdefault(tuple(sorted(attrs.items())), [[0] * nbuckets, 0])
                entry[0] = [a + b for a, b in zip(entry[0], counts)]
                entry[1] += total_ns
            for attrs_key, (counts, total_ns) in merged.items():
                self.metrics.set_histogram(target.duration_metric, dict(attrs_key), counts, total_ns / 1e9)

    def export_metrics(self) -> None:
        if self._metric_transport is None:
            return
        request = self.metrics.otlp_request({"service.name": self.config.agent_service_name,
                                             "host.name": process.host_name(),
                                             "process.pid": os.getpid()})
        try:
            self._metric_transport.send(request, 0)
        except Exception:  # noqa: BLE001
            log.exception("metric export failed")

    def shutdown(self) -> None:
        """Detach first (the watched programs stop paying), then drain and flush."""
        self.stop_event.set()
        for unit in self.units.values():
            if unit.program is not None:
                try:
                    raws = unit.program.drain()
                    if raws:
                        self._account(list(unit.target.decode(raws, self.ctx)))
                except Exception:  # noqa: BLE001
                    log.debug("final drain failed", exc_info=True)
                unit.program.detach_all()
        pending = []
        for target in self.targets:
            pending.extend(target.flush(time.monotonic_ns(), self.ctx, final=True))
        if pending:
            self._account(pending)
        self._export_final = True
        with self._queue_cv:
            self._queue_cv.notify_all()
        for t in self._threads:
            t.join(timeout=3.0)
        self.read_stats()
        self.export_metrics()
        if self._sink is not None:
            self._sink.shutdown()
        for transport in (self._metric_transport, self._log_transport):
            if transport is not None:
                transport.shutdown()
        for unit in self.units.values():
            if unit.program is not None:
                unit.program.close()
                unit.program = None
        for server in (self._server, self._prom_server):
            if server is not None:
                server.shutdown()
                server.server_close()

    # --- health and Prometheus -------------------------------------------------

    def status(self) -> dict:
        units = list(self.units.values())
        attached = sum(len(u.labels) for u in units if u.program is not None)
        failed = [u for u in units if u.error]
        if not self.ready.is_set() or self.stop_event.is_set():
            state = "starting" if not self.stop_event.is_set() else "stopping"
        else:
            state = "degraded" if failed else "ok"  # degraded: some probe could not be attached
        return {
            "status": state,
            "targets": [
                {"target": u.target.name, "path": u.path, "probes": u.labels,
                 **({"error": u.error} if u.error else {}), **({"notes": u.notes} if u.notes else {})}
                for u in units
            ],
            "probes_attached": attached,
            "attach_failures": sum(1 for u in units if u.error),
            "events_seen": sum(u.stats[STAT_EVENTS] for u in units),
            "events_lost": sum(u.stats[STAT_LOST] for u in units),
            "starts_unmatched": sum(u.stats[STAT_UNMATCHED] for u in units),
            "starts_expired": self.counts["starts.expired"],
            "spans_exported": self.counts["spans.exported"],
            "spans_dropped": sum(v for k, v in self.counts.items() if k.startswith("spans.dropped.")),
            "spans_sampled_out": self.counts["spans.sampled_out"] + sum(u.stats[STAT_SAMPLED_OUT] for u in units),
            "sampling_ratio": self.sampling_permille / 1000,
            "queue_length": len(self._queue),
        }

    def _health_response(self, path: str) -> tuple[int, str, str]:
        if path.rstrip("/") != "/healthz":
            return 404, "text/plain", "not found\n"
        status = self.status()
        code = 200 if status["status"] == "ok" else 503
        return code, "application/json", json.dumps(status) + "\n"

    def _prometheus_response(self, path: str) -> tuple[int, str, str]:
        if path.rstrip("/") not in ("/metrics", ""):
            return 404, "text/plain", "not found\n"
        self.read_stats()
        return 200, "text/plain; version=0.0.4", self.metrics.prometheus_text()

    def _serve(self, addr: str, respond) -> ThreadingHTTPServer:
        host, _, port = addr.rpartition(":")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                code, ctype, body = respond(self.path.split("?", 1)[0])
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"otel-ebpf-http-{port}", daemon=True).start()
        return server
