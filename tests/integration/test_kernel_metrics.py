"""Kernel histograms stay exact whatever happens to spans: sampling, a full ring buffer."""
from __future__ import annotations

import time

import psycopg2
import pytest

from otel_ebpf.servers.postgres import PostgresServer
from tests.support.agent import AgentProcess


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer().start()
    yield server
    server.stop()


def send(pg, fast: int, slow: int, failing: int) -> None:
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        for i in range(fast):
            cur.execute(f"SELECT {i}")
        for _ in range(slow):
            cur.execute("SELECT pg_sleep(0.2)")
        for _ in range(failing):
            with pytest.raises(psycopg2.Error):
                cur.execute("SELECT * FROM missing_table")
    conn.close()


def test_sampling_in_kernel_keeps_slow_and_failed_and_counts_everything(pg, otlp_receiver):
    fast, slow, failing = 400, 2, 3
    agent = AgentProcess("--targets", "postgres", "--slow-threshold-ms", "150", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint,
        "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"})
    with agent:
        send(pg, fast, slow, failing)
        time.sleep(1.5)
        status = agent.health()[1]
    assert agent.returncode == 0
    spans = [s for s in otlp_receiver.spans() if s.resource.get("process.pid") == pg.pid]
    slow_spans = [s for s in spans if s.duration_s >= 0.2]
    failed = [s for s in spans if s.status_code == 2]
    fast_spans = len(spans) - len(slow_spans) - len(failed)
    assert len(slow_spans) == slow and len(failed) == failing, "slow and failed operations are always kept"
    assert 5 <= fast_spans <= 100, f"about 10 % of {fast} fast queries expected, got {fast_spans}"
    assert otlp_receiver.db_duration_counts("postgresql") == {("SELECT", None): fast + slow, ("SELECT", "42P01"): failing}
    assert otlp_receiver.counter_total("otel_ebpf.spans.sampled_out") == fast - fast_spans
    assert status["events_lost"] == 0

    logs = [r for req in otlp_receiver.log_requests for rl in req.resource_logs
            for sl in rl.scope_logs for r in sl.log_records]
    slow_logs = [r for r in logs if "pg_sleep" in r.body.string_value or "SELECT" in r.body.string_value]
    assert len(slow_logs) == slow
    assert all(r.severity_text == "WARN" and len(r.trace_id) == 16 for r in slow_logs)
    trace_ids = {s.trace_id for s in slow_spans}
    assert {r.trace_id for r in slow_logs} == trace_ids, "each slow-query log record links to its span"

    exemplars = [e for _res, p, attrs in otlp_receiver.metric_points("db.server.operation.duration")
                 for e in p.exemplars]
    assert exemplars and all(len(e.trace_id) == 16 for e in exemplars)


def test_full_ring_buffer_loses_spans_but_not_counts(pg, otlp_receiver, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("ringbuf_pages: 1\ndrain_interval_ms: 3000\n")  # 4 KiB, read every 3 s
    queries = 300
    agent = AgentProcess("--targets", "postgres", "--config", str(config),
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        time.sleep(0.5)
        send(pg, queries, 0, 0)
        time.sleep(3.5)
        status = agent.health()[1]
    spans = [s for s in otlp_receiver.spans() if s.resource.get("process.pid") == pg.pid]
    assert status["events_lost"] > 0 and len(spans) < queries
    assert len(spans) + status["events_lost"] == queries, "every record is either delivered or counted lost"
    assert otlp_receiver.counter_total("otel_ebpf.events.lost") == status["events_lost"]
    assert otlp_receiver.db_duration_counts("postgresql") == {("SELECT", None): queries}


def test_span_budget_caps_a_burst_at_once(pg, otlp_receiver):
    """A burst right after start, before the agent's adaptive ratio has measured it: the
    kernel's span budget (1 s / --max-spans-per-second per span, 0.1 s of burst) caps it at
    once. Slow and failed operations pass regardless; the histograms count everything."""
    limit = 100
    agent = AgentProcess("--targets", "postgres", "--max-spans-per-second", str(limit), "--slow-threshold-ms",
                         "150", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        t0 = time.monotonic()
        send(pg, 3000, 0, 0)
        burst_s = time.monotonic() - t0
        send(pg, 0, 2, 3)
        time.sleep(1.5)
        status = agent.health()[1]
    spans = [s for s in otlp_receiver.spans() if s.resource.get("process.pid") == pg.pid]
    fast = [s for s in spans if s.status_code != 2 and s.duration_s < 0.15]
    assert len([s for s in spans if s.status_code == 2]) == 3
    assert len([s for s in spans if s.duration_s >= 0.2]) == 2
    # one span per 10 ms of the burst, plus 0.1 s worth of burst, plus a few CPU races
    assert 0 < len(fast) <= limit * (burst_s + 0.1) + 5, (len(fast), burst_s)
    assert otlp_receiver.db_duration_counts("postgresql") == {("SELECT", None): 3000 + 2, ("SELECT", "42P01"): 3}
    assert status["events_lost"] == 0


def test_span_rate_limit_sheds_load_but_counts_everything(pg, otlp_receiver):
    """Above --max-spans-per-second the kernel samples down; slow and failed operations are
    still all kept and the histograms still count every query."""
    agent = AgentProcess("--targets", "postgres", "--max-spans-per-second", "300", "--slow-threshold-ms", "150",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        fast, lowered, deadline = 0, 1.0, time.monotonic() + 20
        while lowered == 1.0 and time.monotonic() < deadline:  # thousands of queries per second
            send(pg, 2000, 0, 0)
            fast += 2000
            lowered = agent.health()[1]["sampling_ratio"]
        send(pg, 10000, 0, 0)  # and many more while the ratio is lowered
        fast += 10000
        send(pg, 0, 2, 3)
        time.sleep(1.5)
        status = agent.health()[1]
    spans = [s for s in otlp_receiver.spans() if s.resource.get("process.pid") == pg.pid]
    failed = [s for s in spans if s.status_code == 2]
    slow_spans = [s for s in spans if s.duration_s >= 0.2]
    assert lowered < 1.0, "the agent should have lowered the sampling ratio"
    assert len(failed) == 3 and len(slow_spans) == 2
    assert len(spans) < fast / 2
    assert otlp_receiver.db_duration_counts("postgresql") == {("SELECT", None): fast + 2, ("SELECT", "42P01"): 3}
    assert status["events_lost"] == 0
