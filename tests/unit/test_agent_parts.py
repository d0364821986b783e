"""The agent's parts without a kernel: a fake program stands in for bcc (as OBI swaps its
ring buffer reader), fake targets for real ones."""
from __future__ import annotations

import dataclasses
import random
import threading
import time
from types import SimpleNamespace

import pytest

from otel_ebpf import health
from otel_ebpf.accountant import SpanAccountant
from otel_ebpf.attacher import FAILED, READY, Attacher, agent_cflags
from otel_ebpf.config import Config
from otel_ebpf.contract import STAT_MAX
from otel_ebpf.discovery import Selection
from otel_ebpf.drainer import Drainer
from otel_ebpf.elf import ElfError
from otel_ebpf.exportworker import STOPPED, ExportWorker
from otel_ebpf.metrics import MetricStore
from otel_ebpf.process import FileId
from otel_ebpf.targets.base import AttachSpec, BuildPlan, DecodeContext, SpanData, Target

EPOCH = 1_700_000_000_000_000_000


class FakeProgram:
    def __init__(self, records: list[bytes] | None = None, fail_attach: bool = False):
        self.records = list(records or [])
        self.attached: list[tuple] = []
        self.maps: dict[str, dict] = {"inflight": {}, "pid_filter": {}}
        self.closed = self.detached = False
        self.fail_attach = fail_attach

    def attach_uprobe(self, fn_name, path, offset, *, retprobe=False, ref_ctr_offset=0, label=""):
        if self.fail_attach:
            from otel_ebpf.bpf import BpfError
            raise BpfError(f"attaching {label}: Operation not permitted")
        self.attached.append((fn_name, path, offset, retprobe, ref_ctr_offset, label))

    def open_ring_buffer(self, map_name="events"):
        pass

    def drain(self):
        out, self.records = self.records, []
        return out

    def percpu_sum(self, map_name, count):
        return [7] * count

    def percpu_value(self, map_name, index):
        return 7

    def table_items(self, map_name):
        return [(SimpleNamespace(value=k), SimpleNamespace(value=v)) for k, v in self.maps.get(map_name, {}).items()]

    def set_array_value(self, map_name, index, value):
        self.maps.setdefault(map_name, {})[index] = value

    def set_hash_value(self, map_name, key, value):
        self.maps.setdefault(map_name, {})[key] = value

    def key(self, map_name, value):
        return SimpleNamespace(value=value)

    def table_delete(self, map_name, keys):
        table = self.maps.setdefault(map_name, {})
        return sum(1 for k in keys if table.pop(k.value, None) is not None)

    def detach_all(self):
        self.detached = True

    def close(self):
        self.closed = True


class FakeTarget(Target):
    name = "fake"
    c_file = "fake.c"
    duration_metric = "fake.duration"
    metric_attributes = ("kind",)
    inflight_keyed_by_tid = True

    def __init__(self, plan_error: Exception | None = None, decode_error: bool = False, kernel: bool = False):
        self.plan_error = plan_error
        self.decode_error = decode_error
        self.kernel_histograms = kernel

    def candidate_paths(self):
        return []

    def matches_process(self, comm, exe):
        return False

    def inspect(self, path):
        raise NotImplementedError

    def plan(self, path, config):
        if self.plan_error:
            raise self.plan_error
        return BuildPlan(["-DFAKE=1"], [AttachSpec("on_start", 0x10, "start"), AttachSpec("on_end", 0x20, "end",
                                                                                        retprobe=True)], ["a note"])

    def decode(self, records, ctx):
        if self.decode_error:
            raise ValueError("a decoder bug")
        return [span(r.decode()) for r in records]


def span(name: str, duration_ms: float = 1.0, error: bool = False, target: str = "fake") -> SpanData:
    start = EPOCH
    return SpanData(name, 2, start, start + int(duration_ms * 1e6), {"kind": name}, 1, target, error)


def unit_for(attacher: Attacher, target: Target, path: str = "/x/bin"):
    (unit,) = attacher.new_units([(target, path, FileId(1, hash(path) & 0xFFFF))])
    return unit


# --- attacher --------------------------------------------------------------------------


def test_attach_compiles_with_the_plan_and_the_agents_cflags():
    programs = []

    def compile_fn(name, c_file, cflags):
        programs.append((name, c_file, cflags))
        return FakeProgram()

    config = Config(max_spans_per_second=1000)
    attacher = Attacher(config, compile_fn)
    unit = attacher.attach(unit_for(attacher, FakeTarget()))
    assert unit.state == READY and unit.labels == ["start", "end"] and unit.notes == ["a note"]
    (name, c_file, cflags) = programs[0]
    assert c_file == "fake.c" and "-DFAKE=1" in cflags and set(agent_cflags(config)) <= set(cflags)
    assert "-DSPAN_INTERVAL_NS=1000000ULL" in cflags
    assert "-DSPAN_BURST_NS=999000000ULL" in cflags, "a quiet agent takes a whole second's budget at once"
    assert set(unit.timings) == {"plan", "compile", "attach"}
    assert attacher.attached() == [unit]


@pytest.mark.parametrize("problem", ["plan", "compile", "attach", "bug"])
def test_a_unit_that_cannot_attach_fails_alone(problem):
    from otel_ebpf.bpf import BpfError

    def compile_fn(name, c_file, cflags):
        bad = name.endswith("/x/bad")
        if problem == "compile" and bad:
            raise BpfError("compiling fake.c: error: nope")
        return FakeProgram(fail_attach=problem == "attach" and bad)

    target = FakeTarget(plan_error=ElfError("/x/bin: no such probe") if problem == "plan" else
                        KeyError("a bug") if problem == "bug" else None)
    attacher = Attacher(Config(), compile_fn)
    bad = attacher.attach(unit_for(attacher, target, "/x/bad"))
    good = attacher.attach(unit_for(attacher, FakeTarget(), "/x/good"))
    assert bad.state == FAILED and bad.error and bad.program is None and bad.labels == []
    assert good.state == READY
    assert attacher.attached() == [good]


def test_units_are_made_once_per_file():
    attacher = Attacher(Config(), lambda *a: FakeProgram())
    target = FakeTarget()
    found = [(target, "/a", FileId(1, 2)), (target, "/b", FileId(1, 2))]
    assert len(attacher.new_units(found)) == 1
    assert attacher.new_units(found) == []


def test_expiry_drops_starts_of_vanished_threads_only():
    program = FakeProgram()
    attacher = Attacher(Config(), lambda *a: program)
    attacher.attach(unit_for(attacher, FakeTarget()))
    program.maps["inflight"] = {100: 1, 200: 2, 300: 3}
    assert attacher.expire_inflight(lambda tid: tid == 200) == 2
    assert set(program.maps["inflight"]) == {200}


def test_pid_filter_gets_the_selection_and_loses_processes_that_are_gone():
    program = FakeProgram()
    attacher = Attacher(Config(include_ports=(5432,)), lambda *a: program)
    attacher.attach(unit_for(attacher, FakeTarget()))
    program.maps["pid_filter"] = {7: 1, 8: 1}  # 8: a child the kernel added at fork
    attacher.apply_selection(Selection(pids={7, 9}), proc_exists=lambda pid: pid != 7)
    assert set(program.maps["pid_filter"]) == {8, 9}


def test_pid_filter_modes():
    assert "-DPID_FILTER=0" in agent_cflags(Config())
    assert "-DPID_FILTER=1" in agent_cflags(Config(include_ports=(80,)))
    assert "-DPID_FILTER=2" in agent_cflags(Config(exclude_containers=("abcdef123456",)))


def test_burst_setting():
    assert "-DSPAN_BURST_NS=49000000ULL" in agent_cflags(Config(max_spans_per_second=1000, max_spans_burst=50))
    assert "-DSPAN_INTERVAL_NS=0ULL" in agent_cflags(Config(max_spans_per_second=0))


# --- drainer -----------------------------------------------------------------------------


def test_drainer_decodes_every_program_and_counts_what_it_cannot():
    good, bad = FakeProgram([b"a", b"b"]), FakeProgram([b"c"])
    programs = iter([good, bad])
    attacher = Attacher(Config(), lambda *a: next(programs))
    u1 = attacher.attach(unit_for(attacher, FakeTarget(), "/x/1"))
    u2 = attacher.attach(unit_for(attacher, FakeTarget(decode_error=True), "/x/2"))
    drainer = Drainer(DecodeContext(EPOCH, Config()), attacher.attached, lambda: [], ringbuf_bytes=4096)
    records, spans = drainer.poll()
    assert records == 3 and [s.name for s in spans] == ["a", "b"]
    assert drainer.counts["spans.dropped.decode_error"] == 1
    assert 0 < u1.ringbuf_peak < 0.01 and u2.ringbuf_peak > 0


# --- accountant --------------------------------------------------------------------------


def accountant(config: Config, kernel: bool = False):
    kept: list = []
    metrics = MetricStore()
    target = FakeTarget(kernel=kernel)
    acc = SpanAccountant(config, metrics, lambda name: target, lambda spans, slow: kept.append((spans, slow)),
                         rng=random.Random(1))
    return acc, metrics, kept


def test_accountant_records_every_span_then_samples_the_rest():
    acc, metrics, kept = accountant(Config(sample_ratio=0.5, slow_threshold_ms=100))
    spans = [span(f"s{i}") for i in range(1000)] + [span("slow", 200)] + [span("failed", error=True)]
    acc.account(spans)
    (out, slow), = kept
    assert 400 < len(out) < 600 and acc.counts["spans.sampled_out"] == 1002 - len(out)
    names = {s.name for s in out}
    assert {"slow", "failed"} <= names, "slow and failed spans are always kept"
    assert [s.name for s in slow] == ["slow"]
    assert all(s.trace_id and s.span_id for s in out)
    assert sum(h.count for h in metrics._hists["fake.duration"].values()) == 1002, "metrics count everything"


def test_kernel_sampled_targets_are_not_sampled_again():
    acc, metrics, kept = accountant(Config(sample_ratio=0.1), kernel=True)
    acc.account([span(f"s{i}") for i in range(100)])
    assert len(kept[0][0]) == 100 and "fake.duration" not in metrics._hists


@pytest.mark.parametrize("sampler,flags,kept_count", [
    ("parentbased_always_on", 0, 0), ("parentbased_always_on", 1, 1), ("always_on", 0, 1),
    ("parentbased_traceidratio", 0, 0),
])
def test_parent_based_sampling(sampler, flags, kept_count):
    acc, _, kept = accountant(Config(traces_sampler=sampler))
    s = span("child")
    s.trace_id, s.parent_span_id, s.trace_flags = b"\x01" * 16, b"\x02" * 8, flags
    acc.account([s])
    assert sum(len(k[0]) for k in kept) == kept_count
    assert sum(acc.sampled_out_by_target.values()) == 1 - kept_count, "a dropped child is counted, per target"
    if kept_count:
        assert kept[0][0][0].trace_id == b"\x01" * 16 and kept[0][0][0].span_id not in (None, b"\x02" * 8)


# --- export worker -----------------------------------------------------------------------


class RecordingSink:
    def __init__(self, ok: bool = True, delay: float = 0.0):
        self.batches: list[list[SpanData]] = []
        self.ok = ok
        self.delay = delay
        self.shut = False

    def export(self, spans):
        time.sleep(self.delay)
        self.batches.append(list(spans))
        return self.ok

    def shutdown(self):
        self.shut = True


def test_export_worker_batches_and_drains_at_stop():
    sink = RecordingSink()
    worker = ExportWorker(sink, queue_size=100, batch_size=10, delay_s=5.0).start()
    worker.put([span(f"s{i}") for i in range(25)], [])
    time.sleep(0.2)
    worker.stop(timeout_s=3)
    assert worker.state == STOPPED and sink.shut
    assert sum(len(b) for b in sink.batches) == 25 and max(len(b) for b in sink.batches) == 10
    assert worker.counts["spans.exported"] == 25


def test_export_worker_counts_every_loss():
    sink = RecordingSink(ok=False)
    logs: list = []
    worker = ExportWorker(sink, queue_size=5, batch_size=100, delay_s=0.05, send_logs=logs.extend).start()
    worker.put([span(f"s{i}") for i in range(8)], [span("slow")])
    time.sleep(0.3)
    worker.stop()
    worker.put([span("late")], [])
    assert worker.counts["spans.dropped.queue_full"] == 3
    assert worker.counts["spans.dropped.export_failed"] == 5
    assert worker.counts["spans.dropped.shutdown"] == 1
    assert [s.name for s in logs] == ["slow"]


def test_export_worker_stops_within_its_deadline_and_counts_what_is_left():
    sink = RecordingSink(delay=0.5)
    worker = ExportWorker(sink, queue_size=1000, batch_size=1, delay_s=0.01).start()
    worker.put([span(f"s{i}") for i in range(20)], [])
    t0 = time.monotonic()
    worker.stop(timeout_s=0.6)
    assert time.monotonic() - t0 < 1.5
    assert worker.counts["spans.exported"] + worker.counts["spans.dropped.shutdown"] == 20
    assert worker.counts["spans.dropped.shutdown"] > 0


# --- health --------------------------------------------------------------------------------


@pytest.mark.parametrize("status,ready,healthz,readyz", [
    ("starting", False, 200, 503), ("ok", True, 200, 200), ("degraded", True, 200, 200),
    ("stopping", False, 503, 503), ("disabled", True, 200, 200),
])
def test_health_endpoints(status, ready, healthz, readyz):
    respond = health.health_responder(lambda: {"status": status, "ready": ready})
    assert respond("/healthz")[0] == healthz
    assert respond("/readyz/")[0] == readyz
    assert respond("/other")[0] == 404


def test_health_server_answers_over_http():
    import json
    import urllib.request

    from otel_ebpf.servers import free_port
    port = free_port()
    server = health.serve(f"127.0.0.1:{port}", health.health_responder(lambda: {"status": "ok", "ready": True}))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        health.close(server)


def test_stats_arrays_have_room_for_every_counter():
    from otel_ebpf.contract import Stat
    assert max(Stat) < STAT_MAX


def test_a_fake_program_stands_in_everywhere():
    # Every method the agent calls on a program exists on the fake (kept in step).
    from otel_ebpf.attacher import ProgramLike
    wanted = {n for n in dir(ProgramLike) if not n.startswith("_")}
    assert wanted <= set(dir(FakeProgram))
    assert dataclasses.is_dataclass(Config)
    assert threading.current_thread()


def test_every_cache_reports_its_size_for_healthz():
    from otel_ebpf import sql
    from otel_ebpf.targets import registry
    before = sql.cache_sizes()
    sql.analyze(f"SELECT {time.monotonic_ns()} FROM cache_size_probe")
    after = sql.cache_sizes()
    assert set(after) == {"sql_shapes", "sql_texts"} and after["sql_texts"] == before["sql_texts"] + 1
    for name in registry.TARGETS:
        sizes = registry.create(name).cache_sizes()
        assert all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in sizes.items()), name
