import io
import os

from otel_ebpf.export import ConsoleSink, ResourceCache, trace_request
from otel_ebpf.metrics import MetricStore
from otel_ebpf.targets.base import KIND_SERVER, SpanData


def span(ms: float, error: bool = False) -> SpanData:
    return SpanData("SELECT orders", KIND_SERVER, 1_000_000_000, 1_000_000_000 + int(ms * 1e6),
                    {"db.system.name": "postgresql", "db.namespace": "shop", "client.port": 5}, 4242, "postgres",
                    error=error, status_message="SQLSTATE 42P01" if error else "")


def test_console_line():
    out = io.StringIO()
    ConsoleSink(ResourceCache(), out, slow_threshold_s=0.5).export([span(12.3), span(800, error=True)])
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["postgresql", "12.3", "ms", "SELECT", "orders", "db=shop", "pid=4242"]
    assert lines[1].endswith("ERROR SQLSTATE 42P01  SLOW")


def test_trace_request_groups_by_resource_and_types():
    req = trace_request([span(1), span(2, error=True)], ResourceCache())
    (rs,) = req.resource_spans
    spans = rs.scope_spans[0].spans
    assert len(spans) == 2 and spans[1].status.code == 2 and spans[0].status.code == 0
    kv = {a.key: a.value for a in spans[0].attributes}
    assert kv["client.port"].int_value == 5 and kv["db.namespace"].string_value == "shop"
    assert len(spans[0].trace_id) == 16 and len(spans[0].span_id) == 8
    assert {a.key for a in rs.resource.attributes} >= {"service.name", "process.pid", "host.name"}


def test_histogram_buckets_and_prometheus_text():
    m = MetricStore()
    for seconds in (0.001, 0.005, 0.2, 3.0, 30.0):
        m.record_duration("db.server.operation.duration", {"db.system.name": "postgresql"}, seconds)
    m.add("otel_ebpf.db.slow_operations", {"db.query.summary": 'SELECT "x"'})
    m.set_gauge("otel_ebpf.ringbuf.usage", {"target": "postgres"}, 0.25)
    text = m.prometheus_text()
    assert 'db_server_operation_duration_seconds_bucket{db_system_name="postgresql",le="0.005"} 2' in text
    assert 'db_server_operation_duration_seconds_bucket{db_system_name="postgresql",le="0.25"} 3' in text
    assert 'db_server_operation_duration_seconds_bucket{db_system_name="postgresql",le="+Inf"} 5' in text
    assert 'db_server_operation_duration_seconds_count{db_system_name="postgresql"} 5' in text
    assert 'otel_ebpf_db_slow_operations_total{db_query_summary="SELECT \\"x\\""} 1' in text
    assert 'otel_ebpf_ringbuf_usage_ratio{target="postgres"} 0.25' in text
    req = m.otlp_request({"service.name": "otel-ebpf"})
    metrics = {x.name: x for x in req.resource_metrics[0].scope_metrics[0].metrics}
    hist = metrics["db.server.operation.duration"].histogram.data_points[0]
    assert list(hist.bucket_counts) == [2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1] and hist.count == 5
    assert metrics["db.server.operation.duration"].unit == "s"


def test_series_cap_overflows():
    m = MetricStore(max_series=3)
    for i in range(10):
        m.add("otel_ebpf.db.slow_operations", {"db.query.summary": f"SELECT t{i}"})
    assert m.counter_value("otel_ebpf.db.slow_operations") == 10
    assert 'otel_metric_overflow="true"' in m.prometheus_text()


def test_trace_request_groups_spans_of_several_processes():
    spans = [span(1), span(2), span(3)]
    spans[1].resource_pid = 4343
    req = trace_request(spans, ResourceCache())
    assert [len(rs.scope_spans[0].spans) for rs in req.resource_spans] == [2, 1]
    assert [rs.scope_spans[0].scope.name for rs in req.resource_spans] == ["otel-ebpf", "otel-ebpf"]


def test_resource_cache_rechecks_a_pid_for_reuse_at_most_once_a_second(monkeypatch):
    from otel_ebpf import export, process

    starts = {"value": 100}
    calls = []

    def stat_fields(pid):
        calls.append(pid)
        return ("server", 1, starts["value"])

    clock = {"now": 1000.0}
    monkeypatch.setattr(process, "stat_fields", stat_fields)
    monkeypatch.setattr(export.time, "monotonic", lambda: clock["now"])
    cache = ResourceCache(service_name_override="svc")
    first = cache.proto(77)
    calls.clear()
    for _ in range(50):
        clock["now"] += 0.01
        assert cache.proto(77) is first
    assert len(calls) == 0  # the drain loop asks every 20 ms; /proc is not read each time
    clock["now"] += 1.0
    assert cache.proto(77) is first
    assert len(calls) == 1  # checked: the same process
    starts["value"] = 200  # pid 77 is now another process
    clock["now"] += 1.5
    assert cache.proto(77) is not first


def test_resources_of_exited_processes_are_forgotten_once_idle(monkeypatch):
    import subprocess
    import sys

    from otel_ebpf import export

    clock = {"now": 5000.0}
    monkeypatch.setattr(export.time, "monotonic", lambda: clock["now"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cache = ResourceCache()
        live, exited = cache.proto(os.getpid()), cache.proto(child.pid)
        assert exited is not live
    finally:
        child.kill()
        child.wait()
    assert cache.forget_exited(idle_s=60) == 0  # just used: its spans may still be queued
    assert cache.proto(child.pid) is exited  # an exited process keeps its Resource meanwhile
    clock["now"] += 61
    assert cache.forget_exited(idle_s=60) == 1
    assert cache.proto(os.getpid()) is live


def test_client_ports_are_not_kept_in_the_attribute_cache():
    from otel_ebpf import export

    export._KV_CACHE.clear()
    export.cached_key_values({"client.port": 40001, "server.port": 5432, "db.system.name": "postgresql"})
    assert {key[0] for key in export._KV_CACHE} == {"server.port", "db.system.name"}
