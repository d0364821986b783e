"""Kernel histograms stay exact whatever happens to spans: sampling, a full ring buffer."""
from __future__ import annotations

import threading
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


def pg_mine(otlp_receiver, pg) -> list:
    return [s for s in otlp_receiver.spans() if s.resource.get("process.pid") == pg.pid]


def test_a_burst_after_a_quiet_second_loses_no_span_at_the_defaults(pg, otlp_receiver):
    """1,000 queries as fast as one connection goes, after a quiet second, and a page's
    N+1 burst (five connections, 40 each): every query is a span, as shipped."""
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        time.sleep(1.1)
        t0 = time.monotonic()
        send(pg, 1000, 0, 0)
        burst_s = time.monotonic() - t0
        otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == pg.pid, 1000)
        time.sleep(1.2)  # quiet again
        threads = [threading.Thread(target=send, args=(pg, 40, 0, 0)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == pg.pid, 1200)
        time.sleep(1.0)
        status = agent.health()[1]
    assert burst_s < 1.0, f"the burst took {burst_s:.2f} s: not a burst on this machine"
    assert len(pg_mine(otlp_receiver, pg)) == 1200
    assert status["spans_sampled_out"] == 0 and status["events_lost"] == 0


def test_sustained_load_above_the_budget_is_sampled_down(pg, otlp_receiver):
    """About three times the default budget (1,000 spans/s) for ten seconds: about the
    budget in spans, every slow and failed operation among them, exact histograms."""
    agent = AgentProcess("--targets", "postgres", "--slow-threshold-ms", "150",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    sent = [0]
    stop = threading.Event()

    def load() -> None:
        conn = psycopg2.connect(pg.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT 1")
                sent[0] += 1
        conn.close()

    with agent:
        time.sleep(1.1)
        workers = [threading.Thread(target=load) for _ in range(3)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        time.sleep(5)
        send(pg, 0, 2, 3)  # in the middle of the load
        time.sleep(5)
        stop.set()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - t0
        time.sleep(1.5)
        status = agent.health()[1]
    rate = sent[0] / elapsed
    spans = pg_mine(otlp_receiver, pg)
    failed = [s for s in spans if s.status_code == 2]
    slow_spans = [s for s in spans if s.duration_s >= 0.2]
    assert rate > 2500, f"{rate:.0f} queries/s: not enough load on this machine to test the budget"
    assert len(failed) == 3 and len(slow_spans) == 2, "slow and failed operations are always kept"
    budget = 1000 * elapsed + 1000  # a second's burst, then one span per millisecond
    assert 0.7 * 1000 * elapsed <= len(spans) <= 1.1 * budget + 5, (len(spans), budget, rate)
    assert otlp_receiver.db_duration_counts("postgresql") == {("SELECT", None): sent[0] + 2,
                                                              ("SELECT", "42P01"): 3}
    assert status["events_lost"] == 0
