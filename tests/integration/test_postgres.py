"""PostgreSQL end to end: real server, real kernel probes, real agent, real OTLP."""
from __future__ import annotations

import time

import psycopg2
import pytest

from otel_ebpf.elf import elf_info
from otel_ebpf.servers.postgres import PostgresServer
from tests.support import procmem
from tests.support.agent import AgentProcess
from tests.support.semconv import assert_registered

CONNECTIONS = 4
QUERIES_PER_CONNECTION = 10


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(env={"OTEL_SERVICE_NAME": "shop-db"}).start()
    server.psql("CREATE DATABASE shop")
    server.psql("CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric)", db="shop")
    yield server
    server.stop()


def semaphore_and_site(pg: PostgresServer) -> tuple[int, bytes]:
    """query__start's semaphore value and first probe-site byte in the running postmaster."""
    info = elf_info(pg.postgres)
    probe = info.usdt("postgresql", "query__start")[0]
    base = procmem.load_base(pg.pid, "/bin/postgres")
    sem = int.from_bytes(procmem.read(pg.pid, base + probe.semaphore, 2), "little")
    return sem, procmem.read(pg.pid, base + probe.pc, 1)


def run_workload(pg: PostgresServer) -> list[str]:
    """N distinct queries over several connections, opened after the agent is healthy."""
    sent = []
    conns = [psycopg2.connect(pg.dsn("shop")) for _ in range(CONNECTIONS)]
    for c in conns:
        c.autocommit = True
    for i in range(QUERIES_PER_CONNECTION):
        for n, c in enumerate(conns):
            key = i * CONNECTIONS + n
            q = (f"INSERT INTO orders (id, customer, total) VALUES ({key}, 'secret-customer-{key}', {key}.5)"
                 if i % 2 == 0 else f"SELECT customer FROM orders WHERE id = {key - CONNECTIONS} AND customer <> 'secret-x{key}'")
            with c.cursor() as cur:
                cur.execute(q)
            sent.append(q)
    with conns[0].cursor() as cur:
        cur.execute("SELECT pg_sleep(0.2)")
        sent.append("SELECT pg_sleep(0.2)")
        with pytest.raises(psycopg2.errors.UndefinedTable):
            cur.execute("SELECT * FROM no_such_table WHERE password = 'secret-pw-1'")
        sent.append("failing")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("INSERT INTO orders (id, customer) VALUES (0, 'secret-dup')")
        sent.append("duplicate")
    for c in conns:
        c.close()
    return sent


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_query_spans_over_otlp(pg, otlp_receiver, protocol):
    pg.psql("TRUNCATE orders", db="shop")
    endpoint = otlp_receiver.grpc_endpoint if protocol == "grpc" else otlp_receiver.http_endpoint
    agent = AgentProcess("--targets", "postgres", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
    agent.start()
    try:
        sem, site = semaphore_and_site(pg)
        assert sem >= 1, "the kernel should have raised query__start's semaphore in the running server"
        assert site == b"\xcc", "a uprobe should sit at query__start"
        status = agent.health()[1]
        assert status["probes_attached"] >= 4

        sent = run_workload(pg)
        mine = lambda s: s.resource.get("process.pid") == pg.pid  # noqa: E731
        spans = otlp_receiver.wait_for_spans(mine, len(sent))
        time.sleep(1.0)  # anything extra would arrive now
        spans = [s for s in otlp_receiver.spans() if mine(s)]
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output()
    assert agent.stop_seconds is not None and agent.stop_seconds < 5.0
    assert len(spans) == len(sent), [s.name for s in spans]

    # Detached: the semaphore is back to zero and the original instruction is restored.
    sem, site = semaphore_and_site(pg)
    assert sem == 0 and site != b"\xcc"

    by_text = {}
    for s in spans:
        assert s.kind == 2  # SERVER
        assert s.attributes["db.system.name"] == "postgresql"
        assert s.attributes["db.namespace"] == "shop"
        assert s.attributes["client.address"] == "127.0.0.1"
        assert isinstance(s.attributes["client.port"], int)
        assert s.attributes["server.port"] == pg.port
        assert s.resource["service.name"] == "shop-db"
        assert s.resource["process.executable.name"] == "postgres"
        assert s.resource["host.name"]
        assert s.end_ns > s.start_ns > time.time_ns() - 300e9
        by_text.setdefault(s.attributes["db.query.text"], []).append(s)

    inserts = by_text["INSERT INTO orders (id, customer, total) VALUES (?)"]
    assert len(inserts) == CONNECTIONS * QUERIES_PER_CONNECTION // 2
    assert {s.name for s in inserts} == {"INSERT orders"} and all(s.status_code == 0 for s in inserts)
    selects = by_text["SELECT customer FROM orders WHERE id = ? AND customer <> ?"]
    assert len(selects) == CONNECTIONS * QUERIES_PER_CONNECTION // 2
    assert all(s.attributes["db.operation.name"] == "SELECT" and s.status_code == 0 for s in selects)

    (slow,) = by_text["SELECT pg_sleep(?)"]
    assert 0.2 <= slow.duration_s < 1.0

    (failed,) = by_text["SELECT * FROM no_such_table WHERE password = ?"]
    assert failed.status_code == 2
    assert failed.attributes["error.type"] == "42P01"
    assert failed.attributes["db.response.status_code"] == "42P01"
    (duplicate,) = by_text["INSERT INTO orders (id, customer) VALUES (?)"]
    assert duplicate.status_code == 2 and duplicate.attributes["error.type"] == "23505"

    # The kernel histogram counted every query: 20 inserts (+1 failed), 20 selects (+1 slow), 1 failed select.
    by_op = otlp_receiver.db_duration_counts("postgresql")
    half = CONNECTIONS * QUERIES_PER_CONNECTION // 2
    assert by_op == {("INSERT", None): half, ("SELECT", None): half + 1,
                     ("INSERT", "23505"): 1, ("SELECT", "42P01"): 1}, by_op

    exported = otlp_receiver.all_exported_text()
    assert "secret" not in exported, "a literal left the agent"

    assert_registered(spans)


def test_health_503_until_attached_and_rollback_is_not_an_error(pg, otlp_receiver):
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        conn = psycopg2.connect(pg.dsn("shop"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT 1")
            cur.execute("ROLLBACK")
        conn.close()
        mine = lambda s: s.resource.get("process.pid") == pg.pid  # noqa: E731
        spans = otlp_receiver.wait_for_spans(mine, 3)
        time.sleep(1.0)
        spans = [s for s in otlp_receiver.spans() if mine(s)]
    assert sorted(s.name for s in spans) == ["BEGIN", "ROLLBACK", "SELECT"]
    assert all(s.status_code == 0 for s in spans)
