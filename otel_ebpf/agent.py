"""The running agent: wiring of the parts, each with one job.

    discovery --(binaries)--> attacher --(programs)--> drainer --(spans)--> accountant
        --(kept spans)--> export worker;  kernel stats --> MetricStore --> telemetry
    health server reads status()

Threads: the main loop (discovery, attaching, draining), the export worker, the
telemetry loop (kernel counters, metric export, in-flight expiry) and the HTTP server.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Mapping

from . import bpf, elf, health, outputs, sql
from .accountant import SpanAccountant
from .attacher import ATTACHING, FAILED, Attacher, CompileFn, Unit
from .config import Config
from .contract import Stat
from .discovery import Selection, find_binaries
from .drainer import IDLE_WAKE_S, Drainer, WakeableEvent, mono_to_epoch_offset, next_drain_wait
from .exportworker import ExportWorker
from .kstats import KernelStats
from .metrics import MetricStore, prometheus_exposition
from .protobuf import kv_cache_size, set_value_length_limit
from .resources import ResourceCache, agent_resource
from .targets import registry
from .targets.base import DecodeContext, SpanData

log = logging.getLogger(__name__)
EXPIRY_INTERVAL_S = 5.0  # how often in-flight starts of vanished threads are dropped
PARENTS_WINDOW_NS = 10 * 10**9  # after a span joined a trace, the kernel looks for parents this long


class Agent:
    def __init__(self, config: Config, span_observer: Callable[[list[SpanData]], None] | None = None,
                 compile_fn: CompileFn | None = None):
        self.config = config
        self.targets = [registry.create(n) for n in (config.targets or registry.available())]
        for target in self.targets:
            target.configure(config)  # e.g. the USDT catalog's own files: a bad one stops the start
        self.metrics = MetricStore()
        self.resources = ResourceCache(config.resource_attributes)
        self.identity = agent_resource(config.agent_service_name, config.resource_attributes, config.health_addr)
        self.attacher = Attacher(config, compile_fn)
        self.ctx = DecodeContext(mono_to_epoch_offset(), config)
        self.drainer = Drainer(self.ctx, self.attacher.attached, lambda: self.targets, config.ringbuf_pages * 4096)
        self.outputs = outputs.Outputs(config, self.resources)
        self.exporter = ExportWorker(self.outputs.spans, config.queue_size, config.batch_size,
                                     config.export_delay_ms / 1000.0, self.outputs.logs, span_observer)
        self.accountant = SpanAccountant(config, self.metrics, registry.get, self.exporter.put)
        self.kstats = KernelStats(self.metrics, self.attacher.all_units, lambda: self.targets, registry.get)
        self.selection = Selection()
        self.counts = collections.Counter[str]()  # starts.expired
        self.stop_event = WakeableEvent()
        self.ready = threading.Event()  # the first attach round is over
        self._servers: list = []
        self._warned: set[str] = set()
        self._parents_told: dict[str, int] = {}  # target -> when the kernel was last told (mono ns)
        set_value_length_limit(config.attribute_value_length_limit)
        elf.set_cache_dir(None if config.cache_dir == "off" else (config.cache_dir or elf.default_cache_dir()))

    # --- running ----------------------------------------------------------------------

    def start(self) -> None:
        self._servers.append(health.serve(self.config.health_addr, health.health_responder(self.status)))
        if self.config.prometheus_addr:
            self._servers.append(health.serve(self.config.prometheus_addr, self._prometheus))
        self.exporter.start()
        threading.Thread(target=self._telemetry_loop, name="otel-ebpf-telemetry", daemon=True).start()
        if self.config.sdk_disabled:
            log.warning("OTEL_SDK_DISABLED=true: nothing is attached and nothing is exported")
        else:
            stale = bpf.remove_stale_events()
            if stale:
                log.info("removed %d uprobe events left by agents that were killed", stale)
            self.attach_new(check=True)
        self.ready.set()

    def run(self) -> None:
        """Drain until stop_event is set, then shut down cleanly."""
        self.start()
        try:
            busy_wait_s = self.config.drain_interval_ms / 1000.0
            wait_s, last_scan = busy_wait_s, time.monotonic()
            while not self.stop_event.is_set():
                records = self.poll_once()
                if time.monotonic() - last_scan > self.config.rescan_interval_s and not self.config.sdk_disabled:
                    last_scan = time.monotonic()
                    self.attach_new()
                    self.resources.forget_exited()
                wait_s = next_drain_wait(records, wait_s, busy_wait_s)
                if not records:  # nothing came: sleep until something does, then let a batch gather
                    rescan_in = self.config.rescan_interval_s - (time.monotonic() - last_scan)
                    self.drainer.wait_for_records(max(0.0, min(IDLE_WAKE_S, rescan_in)), self.stop_event)
                self.stop_event.wait(wait_s)
        finally:
            self.shutdown()

    def attach_new(self, check: bool = False) -> None:
        """Find binaries and attach the new ones (attacher.attach_all: compiles run side by
        side in child processes). With `check` (the first round) a binary the configuration
        cannot use stops the agent."""
        self.selection = find_binaries(self.targets, self.config, self._warn_once)
        if check:
            for target, path, _fid in self.selection.binaries:
                target.check(path)
        self.attacher.attach_all(self.attacher.new_units(self.selection.binaries))
        self.attacher.apply_selection(self.selection)

    def poll_once(self, final: bool = False) -> int:
        records, spans = self.drainer.poll(final)
        if spans:
            for pid in {s.resource_pid for s in spans}:
                self.resources.proto(pid)  # read /proc now: a short-lived client may be gone later
            self._note_parents(spans)
            self.accountant.account(spans)
        return records

    def _note_parents(self, spans: list[SpanData]) -> None:
        """Spans that joined an application's trace: their targets' kernel side keeps
        sampled parents over the budget for a while (probes/common.h keep_for_parent)."""
        joined = {s.target for s in spans if s.parent_span_id}
        if not joined:
            return
        now = time.monotonic_ns()
        due = {t for t in joined if now - self._parents_told.get(t, 0) > 10**9}
        if due:
            for t in due:
                self._parents_told[t] = now
            self.attacher.parents_seen(due, now + PARENTS_WINDOW_NS)

    def _telemetry_loop(self) -> None:
        """Metrics when they are due and the expiry of dead threads' starts; counters are
        read then, or when /healthz or /metrics asks (an idle agent should not wake for them)."""
        interval = self.config.metric_interval_ms / 1000.0
        next_export = time.monotonic() + interval
        next_expiry = time.monotonic() + EXPIRY_INTERVAL_S
        while not self.stop_event.wait(max(0.0, min(next_export, next_expiry) - time.monotonic())):
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + EXPIRY_INTERVAL_S
                self.counts["starts.expired"] += self.attacher.expire_inflight()
            if now >= next_export:
                next_export = now + interval
                self.read_stats()
                self.outputs.send_metrics(self.metrics, self.identity)

    def read_stats(self, histograms: bool = True) -> None:
        self.kstats.read(self.agent_counts(), self.config.sample_ratio, self.accountant.sampled_out_by_target,
                         histograms=histograms)

    def agent_counts(self) -> collections.Counter[str]:
        return self.counts + self.exporter.counts + self.drainer.counts + self.accountant.counts

    def shutdown(self) -> None:
        """Detach first (the watched programs stop paying), then drain and flush."""
        self.stop_event.set()
        began = time.monotonic()
        self.attacher.detach_all()
        detached = time.monotonic()
        self.poll_once(final=True)
        self.exporter.stop()
        self.read_stats()
        self.outputs.send_metrics(self.metrics, self.identity)
        self.outputs.shutdown()
        flushed = time.monotonic()
        self.attacher.close_all()
        for server in self._servers:
            health.close(server)
        log.info("stopped in %.1f s: probes detached in %.1f s, telemetry flushed in %.1f s",
                 time.monotonic() - began, detached - began, flushed - detached)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    # --- what it says about itself --------------------------------------------------------

    def status(self) -> dict:
        self.read_stats(histograms=False)  # fresh counters for whoever asks
        units = self.attacher.all_units()
        failed = [u for u in units if u.state == FAILED]
        attaching = not self.ready.is_set() or any(u.state == ATTACHING for u in units)
        if self.stop_event.is_set():
            state = "stopping"
        elif self.config.sdk_disabled:
            state = "disabled"
        elif attaching:
            state = "starting"
        else:
            state = "degraded" if failed else "ok"
        counts = self.agent_counts()
        return {
            "status": state,
            "ready": not attaching and not self.stop_event.is_set(),
            "service.instance.id": self.identity.get("service.instance.id"),
            "targets": [_unit_status(u) for u in units],
            "probes_attached": sum(len(u.labels) for u in units if u.program is not None),
            "attach_failures": len(failed),
            "events_seen": sum(u.stats[Stat.EVENTS] for u in units),
            "events_lost": sum(u.stats[Stat.LOST] for u in units),
            "starts_unmatched": sum(u.stats[Stat.UNMATCHED] for u in units),
            "starts_expired": counts["starts.expired"],
            "spans_exported": counts["spans.exported"],
            "spans_dropped": sum(v for k, v in counts.items() if k.startswith("spans.dropped.")),
            "spans_sampled_out": counts["spans.sampled_out"] + counts["spans.parent_unsampled"]
            + sum(u.stats[Stat.SAMPLED_OUT] for u in units),
            "spans_parent_unsampled": counts["spans.parent_unsampled"],
            "spans_kept_by_parent": sum(u.stats[Stat.KEPT_BY_PARENT] for u in units),
            "sampling_ratio": self.config.sample_ratio,
            "queue_length": len(self.exporter),
            "caches": self.cache_sizes(units),
        }

    def cache_sizes(self, units: list[Unit]) -> dict[str, int]:
        """Entries in each bounded cache of the agent (the soak watches them over time)."""
        sizes = {"resources": len(self.resources), "span_attributes": kv_cache_size(), **sql.cache_sizes()}
        for target in {id(u.target): u.target for u in units}.values():
            sizes.update(target.cache_sizes())
        return sizes

    def _prometheus(self, path: str, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """/metrics: the Prometheus text format, or OpenMetrics (with exemplars) when asked."""
        if path.rstrip("/") not in ("/metrics", ""):
            return 404, "text/plain", b"not found\n"
        self.read_stats()
        body, ctype = prometheus_exposition(self.metrics, headers.get("Accept"))
        return 200, ctype, body


def _unit_status(u: Unit) -> dict:
    out: dict = {"target": u.target.name, "path": u.path, "state": u.state, "probes": u.labels}
    if u.error:
        out["error"] = u.error
    if u.notes:
        out["notes"] = u.notes
    if u.timings:
        out["seconds"] = {k: round(v, 3) for k, v in u.timings.items()}
    return out
