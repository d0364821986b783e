"""PostgreSQL's extended query protocol (Parse/Bind/Execute), end to end: the client
libraries applications use (psycopg 3 with parameters, prepared and in pipeline mode,
asyncpg, pgbench -M extended/prepared), SQL-level PREPARE/EXECUTE, failures in every
phase, and no double counting. The agent runs as shipped."""
from __future__ import annotations

import asyncio
import re
import subprocess
import time

import psycopg
import psycopg2
import pytest

from otel_ebpf.servers import run_as
from otel_ebpf.servers.postgres import PostgresServer
from tests.support.agent import AgentProcess
from tests.support.semconv import assert_registered

SECRET = "s3cr3t-param"  # a bound parameter value: must never leave the agent


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(env={"OTEL_SERVICE_NAME": "shop-db"}).start()
    server.psql("CREATE DATABASE shop")
    server.psql("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)", db="shop")
    server.psql("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 100) g", db="shop")
    server.psql("""CREATE FUNCTION item_total() RETURNS numeric LANGUAGE plpgsql AS $$
        DECLARE t numeric; BEGIN
          SELECT sum(price) INTO t FROM items;
          PERFORM count(*) FROM items WHERE price > 10;
          RETURN t; END $$""", db="shop")
    yield server
    server.stop()


@pytest.fixture
def agent(otlp_receiver):
    a = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    a.start()
    yield a
    assert a.stop() == 0, a.output()


def connect(pg: PostgresServer, **kw) -> psycopg.Connection:
    return psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=shop", autocommit=True, **kw)


def spans_of(otlp_receiver, pg, count: int, match=lambda s: True, settle: float = 1.0) -> list:
    mine = lambda s: s.resource.get("process.pid") == pg.pid and match(s)  # noqa: E731
    otlp_receiver.wait_for_spans(mine, count)
    time.sleep(settle)  # anything extra would arrive now
    return [s for s in otlp_receiver.spans() if mine(s)]


def texts(spans) -> list[str]:
    return sorted(s.attributes.get("db.query.text", "") for s in spans)


def test_psycopg3_parameters_give_one_span_per_statement(pg, agent, otlp_receiver):
    with connect(pg) as conn:
        for i in range(1, 31):
            conn.execute("SELECT name, price FROM items WHERE id = %s AND name <> %s", (i, SECRET))
    spans = spans_of(otlp_receiver, pg, 30)
    assert len(spans) == 30, [s.name for s in spans]
    for s in spans:
        assert s.name == "SELECT items" and s.kind == 2 and s.status_code == 0
        assert s.attributes["db.query.text"] == "SELECT name, price FROM items WHERE id = $1 AND name <> $2"
        assert s.attributes["db.operation.name"] == "SELECT"
        assert s.attributes["db.namespace"] == "shop"
        assert s.attributes["client.address"] == "127.0.0.1" and s.attributes["server.port"] == pg.port
        assert s.resource["service.name"] == "shop-db"
    assert SECRET not in otlp_receiver.all_exported_text()
    assert_registered(spans)
    time.sleep(1.2)  # one more metric export
    assert otlp_receiver.db_duration_counts("postgresql").get(("SELECT", None)) == 30


def test_a_statement_prepared_once_and_executed_many_times(pg, agent, otlp_receiver):
    with connect(pg) as conn:
        for i in range(25):
            conn.execute("UPDATE items SET price = price + %s WHERE id = %s", (1, i % 10 + 1), prepare=True)
    spans = spans_of(otlp_receiver, pg, 25)
    assert len(spans) == 25
    assert set(texts(spans)) == {"UPDATE items SET price = price + $1 WHERE id = $2"}
    assert {s.name for s in spans} == {"UPDATE items"}


def test_pipeline_mode_with_an_error_skips_the_rest_until_sync(pg, agent, otlp_receiver):
    with connect(pg) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT price FROM items WHERE id = %s", (1,))
                conn.execute("SELECT price FROM items WHERE id = %s", (2,))
                conn.execute("SELECT price / %s FROM items WHERE id = 3", (0,))
                conn.execute("SELECT name FROM items WHERE id = %s", (4,))  # skipped by the server
                conn.execute("SELECT name FROM items WHERE id = %s", (5,))  # skipped by the server
        with conn.pipeline():  # and the next pipeline is traced again
            for i in range(6, 10):
                conn.execute("SELECT id FROM items WHERE id = %s", (i,))
    spans = spans_of(otlp_receiver, pg, 7)
    assert len(spans) == 7, texts(spans)
    failed = [s for s in spans if s.status_code == 2]
    assert len(failed) == 1 and failed[0].attributes["error.type"] == "22012"
    assert failed[0].attributes["db.query.text"] == "SELECT price / $1 FROM items WHERE id = ?"
    assert failed[0].attributes["db.response.status_code"] == "22012"
    assert not [s for s in spans if s.attributes["db.query.text"].startswith("SELECT name")], "skipped: no span"
    assert len([s for s in spans if s.attributes["db.query.text"] == "SELECT id FROM items WHERE id = $1"]) == 4


def test_failures_in_parse_bind_and_execute(pg, agent, otlp_receiver):
    with connect(pg) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC name FROM items WHERE id = %s", (1,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT name FROM no_such_items WHERE id = %s", (1,))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT name FROM items WHERE id = %s::int", (SECRET,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO items (id, name) VALUES (%s, %s)", (1, SECRET))
        conn.execute("SET statement_timeout = 100")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(%s)", (2,))
        conn.execute("SELECT 1 WHERE 1 = %s", (1,))  # and the next statement is a success
    spans = spans_of(otlp_receiver, pg, 7)
    by_code = {s.attributes.get("error.type"): s for s in spans}
    assert set(by_code) == {"42601", "42P01", "22P02", "23505", "57014", None}, texts(spans)
    assert by_code["42601"].attributes["db.query.text"].startswith("SELEC name FROM items")
    assert by_code["42P01"].attributes["db.query.text"] == "SELECT name FROM no_such_items WHERE id = $1"
    assert by_code["22P02"].attributes["db.query.text"] == "SELECT name FROM items WHERE id = $1::int"
    assert by_code["57014"].attributes["db.query.text"] == "SELECT pg_sleep($1)"
    assert by_code["57014"].duration_s >= 0.09
    assert all(s.status_code == 2 for code, s in by_code.items() if code)
    assert SECRET not in otlp_receiver.all_exported_text()
    assert len(spans) == 7  # SET and the last SELECT succeed


def test_asyncpg(pg, agent, otlp_receiver):
    import asyncpg

    async def work() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="shop")
        try:
            for i in range(1, 21):
                await conn.fetchrow("SELECT name FROM items WHERE id = $1 AND name <> $2", i, SECRET)
            stmt = await conn.prepare("SELECT count(*) FROM items WHERE price > $1")
            for i in range(10):
                await stmt.fetchval(i)
        finally:
            await conn.close()

    asyncio.run(work())
    spans = spans_of(otlp_receiver, pg, 30, lambda s: "items" in s.attributes.get("db.query.text", ""))
    assert len(spans) == 30, texts(spans)
    assert texts(spans).count("SELECT name FROM items WHERE id = $1 AND name <> $2") == 20
    assert texts(spans).count("SELECT count(*) FROM items WHERE price > $1") == 10
    assert SECRET not in otlp_receiver.all_exported_text()


def test_sql_level_prepare_and_execute(pg, agent, otlp_receiver):
    with connect(pg) as conn:
        conn.execute("PREPARE one_item (int) AS SELECT name FROM items WHERE id = $1", prepare=False)
        for i in range(3):
            conn.execute(f"EXECUTE one_item({i + 1})", prepare=False)
        conn.execute("DEALLOCATE one_item", prepare=False)
    spans = spans_of(otlp_receiver, pg, 5)
    assert len(spans) == 5, texts(spans)
    assert texts(spans).count("EXECUTE one_item(?)") == 3


def test_functions_running_sql_inside_are_one_span(pg, agent, otlp_receiver):
    with connect(pg) as conn:
        for _ in range(4):
            conn.execute("SELECT item_total() WHERE 1 = %s", (1,))
        with conn.cursor() as cur:  # and as a simple query (psql's way)
            cur.execute("SELECT item_total()", prepare=False)
    spans = spans_of(otlp_receiver, pg, 5)
    assert len(spans) == 5, texts(spans)
    assert all("item_total()" in t for t in texts(spans))


def test_a_portal_executed_in_chunks_is_one_span_per_execute(pg, agent, otlp_receiver):
    """asyncpg's cursor sends Execute with max_rows: the server suspends the portal after
    each chunk and resumes it at the next Execute. One span per Execute message."""
    import asyncpg

    async def work() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="shop")
        try:
            async with conn.transaction():
                return len([r async for r in conn.cursor("SELECT id FROM items WHERE id > $1", 0, prefetch=30)])
        finally:
            await conn.close()

    assert asyncio.run(work()) == 100
    text = "SELECT id FROM items WHERE id > $1"
    spans = spans_of(otlp_receiver, pg, 4, lambda s: s.attributes.get("db.query.text") == text)
    assert len(spans) == 4, "30 + 30 + 30 + 10 rows: four Execute messages"


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_protocols_count_exactly(pg, agent, otlp_receiver, mode):
    run_as("postgres", [f"{pg.bin}/pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "shop"])
    r = run_as("postgres", [f"{pg.bin}/pgbench", "-n", "-S", "-M", mode, "-c", "2", "-t", "150",
                            "-h", "127.0.0.1", "-p", str(pg.port), "shop"])
    assert r.returncode == 0, r.stderr
    assert re.search(r"number of transactions actually processed: 300/300", r.stdout), r.stdout
    pattern = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    spans = spans_of(otlp_receiver, pg, 300, lambda s: s.attributes.get("db.query.text", "").startswith(pattern))
    assert len(spans) == 300
    time.sleep(1.5)
    # pgbench runs SELECTs of its own (and -i before it): this agent started with the test
    # and every SELECT is a span at this rate (within the budget's burst), so the two agree.
    counted = otlp_receiver.db_duration_counts("postgresql").get(("SELECT", None), 0)
    selects = [s for s in otlp_receiver.spans()
               if s.resource.get("process.pid") == pg.pid and s.attributes.get("db.operation.name") == "SELECT"]
    assert counted == len(selects) >= 300, sorted({s.attributes.get("db.query.text") for s in selects})


def test_simple_queries_still_give_exactly_one_span(pg, agent, otlp_receiver):
    cmd = [f"{pg.bin}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-d", "shop", "-c",
           "SELECT 1; SELECT 2", "-c", "SELECT count(*) FROM items"]
    subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *cmd], check=True,
                   capture_output=True)
    spans = spans_of(otlp_receiver, pg, 2)
    assert texts(spans) == ["SELECT ?; SELECT ?", "SELECT count(*) FROM items"]


def test_notices_warnings_and_caught_errors_are_no_failures(pg, agent, otlp_receiver):
    """errcode() runs for notices and warnings too: only an ERROR fails a statement."""
    statements = [
        "CREATE TABLE IF NOT EXISTS items (id int)",  # NOTICE 42P07: relation exists, skipping
        "ROLLBACK",  # WARNING 25P01: no transaction in progress (and transaction__abort fires)
        "DO $$ BEGIN PERFORM 1 / 0; EXCEPTION WHEN division_by_zero THEN NULL; END $$",  # caught
        "SELECT 1",
    ]
    with connect(pg) as conn:  # the extended protocol
        for sql in statements:
            conn.execute(sql)
    simple = psycopg2.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=shop")
    simple.autocommit = True
    with simple.cursor() as cur:  # the simple protocol
        for sql in statements:
            cur.execute(sql)
    simple.close()
    spans = spans_of(otlp_receiver, pg, 2 * len(statements))
    assert len(spans) == 2 * len(statements), texts(spans)
    assert [s.attributes.get("error.type") for s in spans] == [None] * len(spans), texts(spans)
    assert all(s.status_code == 0 for s in spans)


def test_an_error_in_a_failed_transaction_block_is_counted(pg, agent, otlp_receiver):
    """25P02 fires no abort: its span is lost, but the histogram counts it (when the
    backend starts its next statement) and the loss is counted."""
    simple = psycopg2.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=shop")
    with simple.cursor() as cur:
        with pytest.raises(psycopg2.errors.DivisionByZero):
            cur.execute("SELECT 1 / 0")  # psycopg2 opened a transaction block first
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            cur.execute("SELECT 2")
    simple.rollback()
    simple.close()
    spans = spans_of(otlp_receiver, pg, 3)
    assert sorted(s.name for s in spans) == ["BEGIN", "ROLLBACK", "SELECT"], texts(spans)
    assert [s.attributes.get("error.type") for s in spans if s.name == "SELECT"] == ["22012"]

    def failed_in_block() -> int:
        return max((p.count for _res, p, attrs in otlp_receiver.metric_points("db.server.operation.duration")
                    if attrs.get("error.type") == "25P02"), default=0)

    deadline = time.monotonic() + 10
    while failed_in_block() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert failed_in_block() == 1


def test_an_error_in_a_background_process_is_no_span(pg, agent, otlp_receiver):
    """An autovacuum worker cancelled (what a conflicting lock or DDL does to it every day:
    ERROR 57014 "canceling autovacuum task") runs errstart() and an abort in a postgres
    process, but serves no client: no span, no failed operation in the histogram."""
    with connect(pg) as conn:
        conn.execute("CREATE TABLE churn (id int, pad text) WITH (autovacuum_vacuum_threshold = 0, "
                     "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 100, "
                     "autovacuum_vacuum_cost_limit = 1)")
        conn.execute("INSERT INTO churn SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
        conn.execute("DELETE FROM churn")
        conn.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        conn.execute("SELECT pg_reload_conf()")
        try:
            worker = None
            deadline = time.monotonic() + 60  # crawling at 100 ms a page: it stays for minutes
            while worker is None and time.monotonic() < deadline:
                worker = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
                                      "AND query LIKE '%churn%'").fetchone()
                time.sleep(0.2)
            assert worker is not None, "no autovacuum worker started on the table"
            conn.execute("SELECT pg_cancel_backend(%s)", worker)
            deadline = time.monotonic() + 10
            while "canceling autovacuum task" not in pg.log_tail() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "canceling autovacuum task" in pg.log_tail()
        finally:
            conn.execute("ALTER SYSTEM RESET autovacuum_naptime")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP TABLE churn")
    spans_of(otlp_receiver, pg, 1, lambda s: "pg_cancel_backend" in s.attributes.get("db.query.text", ""), settle=2.0)
    failed = spans_of(otlp_receiver, pg, 0, lambda s: s.status_code == 2, settle=0)
    assert failed == [], [(s.name, s.attributes) for s in failed]
    time.sleep(1.2)  # one more metric export
    failures = {key: n for key, n in otlp_receiver.db_duration_counts("postgresql").items() if key[1]}
    assert failures == {}, failures
