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
    assert 'db_server_operation_duration_seconds_bucket{db_system_name="postgresql",le="0.005"} 2.0' in text
    assert 'db_server_operation_duration_seconds_bucket{db_system_name="postgresql",le="0.25"} 3.0' in text
    assert 'db_server_operation_duration_seconds_bucket{db_system_name="postgresql",le="+Inf"} 5.0' in text
    assert 'db_server_operation_duration_seconds_count{db_system_name="postgresql"} 5.0' in text
    assert 'otel_ebpf_db_slow_operations_total{db_query_summary="SELECT \\"x\\""} 1.0' in text
    assert 'otel_ebpf_ringbuf_usage_ratio{target="postgres"} 0.25' in text
    req = m.otlp_request({"service.name": "otel-ebpf"})
    metrics = {x.name: x for x in req.resource_metrics[0].scope_metrics[0].metrics}
    hist = metrics["db.server.operation.duration"].histogram.data_points[0]
    assert list(hist.bucket_counts) == [2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1] and hist.count == 5
    assert metrics["db.server.operation.duration"].unit == "s"


# ---------------------------------------------------------------- Prometheus exposition


def parse(text: str) -> dict[str, list]:
    """Families by name, through prometheus_client's own parser: what a scraper reads."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_exposition_is_prometheus_clients_text_format():
    from otel_ebpf.metrics import prometheus_exposition

    m = MetricStore()
    m.record_duration("http.server.request.duration", {"http.request.method": "GET"}, 0.02)
    m.set_counter("otel_ebpf.events", {"target": "nginx"}, 7)
    m.set_gauge("otel_ebpf.sampling.ratio", {}, 0.5)
    m.set_gauge("otel_ebpf.probes.attached", {}, 4)
    body, content_type = prometheus_exposition(m)
    assert isinstance(body, bytes) and content_type.startswith("text/plain; version=0.0.4")
    assert m.prometheus_text() == body.decode()
    families = parse(body.decode())
    assert families["http_server_request_duration_seconds"].type == "histogram"
    assert families["otel_ebpf_events"].type == "counter"  # the parser strips _total
    assert [s.name for s in families["otel_ebpf_events"].samples] == ["otel_ebpf_events_total"]
    # The gauge of unit "1" named *.ratio is not *_ratio_ratio (the collector's rule).
    assert families["otel_ebpf_sampling_ratio"].samples[0].value == 0.5
    assert families["otel_ebpf_probes_attached"].type == "gauge"
    buckets = [s for s in families["http_server_request_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets][:3] == ["0.005", "0.01", "0.025"] and buckets[-1].labels["le"] == "+Inf"
    assert {s.labels["le"] for s in buckets} >= {"1", "10"}  # as Go writes them, not 1.0


HOSTILE = {
    'quote " and \\ backslash': 'quote " and \\ backslash',
    "new\nline": "new\nline",
    "brace } and {x=\"y\"} and comma,=": "brace } and {x=\"y\"} and comma,=",
    "bytes \udcff\udcfe from surrogateescape": "bytes \ufffd\ufffd from surrogateescape",
    "lone \ud800 surrogate": "lone \ufffd surrogate",
}


def test_hostile_label_values_are_escaped_by_the_library():
    from otel_ebpf.metrics import prometheus_exposition

    m = MetricStore()
    for i, value in enumerate(HOSTILE):
        m.add("otel_ebpf.db.slow_operations", {"db.query.summary": value, "db.namespace": f"db{i}"})
    m.add("otel_ebpf.db.slow_operations", {"db.query.summary": b"raw \xff bytes", "db.namespace": "raw"})
    body, _ = prometheus_exposition(m)
    body.decode("utf-8")  # always valid UTF-8
    lines = [ln for ln in body.decode().splitlines() if not ln.startswith("#")]
    assert len(lines) == len(HOSTILE) + 1, "a label value broke out of its line"
    samples = parse(body.decode())["otel_ebpf_db_slow_operations"].samples
    got = {s.labels["db_namespace"]: s.labels["db_query_summary"] for s in samples}
    for i, expected in enumerate(HOSTILE.values()):
        assert got[f"db{i}"] == expected
    assert got["raw"] == "raw \ufffd bytes"
    assert all(s.value == 1.0 for s in samples)


def test_series_of_one_metric_may_carry_different_labels():
    m = MetricStore()
    m.record_duration("db.server.operation.duration", {"db.system.name": "postgresql"}, 0.01)
    m.record_duration("db.server.operation.duration", {"db.system.name": "postgresql", "error.type": "42P01"}, 0.01)
    samples = parse(m.prometheus_text())["db_server_operation_duration_seconds"].samples
    counts = [s for s in samples if s.name.endswith("_count")]
    assert sorted(s.labels.get("error_type", "") for s in counts) == ["", "42P01"]


def test_openmetrics_on_request_carries_exemplars():
    from otel_ebpf.metrics import prometheus_exposition

    m = MetricStore()
    m.record_duration("db.server.operation.duration", {"db.system.name": "mariadb"}, 0.2)
    m.set_exemplar("db.server.operation.duration", {"db.system.name": "mariadb"}, 0.2, 1_700_000_000 * 10**9,
                   bytes.fromhex("0af7651916cd43dd8448eb211c80319c"), bytes.fromhex("b7ad6b7169203331"))
    body, content_type = prometheus_exposition(m, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.rstrip().endswith("# EOF")
    (line,) = [ln for ln in text.splitlines() if "trace_id=" in ln]
    assert 'le="0.25"' in line and 'trace_id="0af7651916cd43dd8448eb211c80319c"' in line


def test_prometheus_names_follow_the_collectors_rules():
    from otel_ebpf.metrics import prometheus_label_name, prometheus_name

    assert prometheus_name("db.server.operation.duration", "s", "histogram") == "db_server_operation_duration_seconds"
    assert prometheus_name("otel_ebpf.events", "{event}", "counter") == "otel_ebpf_events_total"
    assert prometheus_name("otel_ebpf.ringbuf.usage", "1", "gauge") == "otel_ebpf_ringbuf_usage_ratio"
    assert prometheus_name("otel_ebpf.sampling.ratio", "1", "gauge") == "otel_ebpf_sampling_ratio"
    assert prometheus_name("otel_ebpf.sampling.ratio", "1", "counter") == "otel_ebpf_sampling_ratio_total"
    assert prometheus_name("requests.total", "", "counter") == "requests_total"
    assert prometheus_name("http.server.request.body.size", "By", "histogram") == "http_server_request_body_size_bytes"
    assert prometheus_name("io.rate", "By/s", "gauge") == "io_rate_bytes_per_second"
    assert prometheus_name("cpu.time.seconds", "s", "counter") == "cpu_time_seconds_total"
    assert prometheus_name("2xx.responses", "{response}", "gauge") == "_2xx_responses"
    assert prometheus_label_name("db.system.name") == "db_system_name"
    assert prometheus_label_name("_private") == "key_private"
    assert prometheus_label_name("9lives") == "key_9lives"
    assert prometheus_label_name("__reserved") == "__reserved"


def test_every_metric_has_a_unit_a_description_and_a_kind():
    from otel_ebpf.metrics import METRIC_INFO, METRIC_KINDS, prometheus_series_names

    assert set(METRIC_KINDS) == set(METRIC_INFO)
    assert set(METRIC_KINDS.values()) <= {"histogram", "counter", "gauge"}
    names = [n for metric in METRIC_INFO for n in prometheus_series_names(metric)]
    assert len(names) == len(set(names)), "two metrics share a Prometheus name"
    for metric, kind in METRIC_KINDS.items():
        if kind == "histogram":
            assert METRIC_INFO[metric][0] == "s", metric


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


def test_resource_cache_rechecks_a_pid_for_reuse_at_most_every_few_seconds(monkeypatch):
    from otel_ebpf import process, resources

    starts = {"value": 100}
    calls = []

    def stat_fields(pid):
        calls.append(pid)
        return ("server", 1, starts["value"])

    clock = {"now": 1000.0}
    monkeypatch.setattr(process, "stat_fields", stat_fields)
    monkeypatch.setattr(resources.time, "monotonic", lambda: clock["now"])
    cache = ResourceCache(service_name_override="svc")
    first = cache.proto(77)
    calls.clear()
    for _ in range(50):
        clock["now"] += 0.01
        assert cache.proto(77) is first
    assert len(calls) == 0  # the drain loop asks every 20 ms; /proc is not read each time
    clock["now"] += ResourceCache.RECHECK_S
    assert cache.proto(77) is first
    assert len(calls) == 1  # checked: the same process
    starts["value"] = 200  # pid 77 is now another process
    clock["now"] += ResourceCache.RECHECK_S + 0.5
    assert cache.proto(77) is not first


def test_resources_of_exited_processes_are_forgotten_once_idle(monkeypatch):
    import subprocess
    import sys

    from otel_ebpf import resources

    clock = {"now": 5000.0}
    monkeypatch.setattr(resources.time, "monotonic", lambda: clock["now"])
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
    from otel_ebpf import protobuf

    protobuf._KV_CACHE.clear()
    protobuf.cached_key_values({"client.port": 40001, "server.port": 5432, "db.system.name": "postgresql"})
    assert {key[0] for key in protobuf._KV_CACHE} == {"server.port", "db.system.name"}
