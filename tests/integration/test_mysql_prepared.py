"""MariaDB prepared statements (COM_STMT_PREPARE / COM_STMT_EXECUTE), end to end, with the
client library applications use for them: mysql-connector-python's prepared cursors, pure
Python and C extension. The agent runs as shipped."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from otel_ebpf.servers.mariadb import MariadbServer
from tests.support.agent import AgentProcess
from tests.support.prereq import require_binary
from tests.support.semconv import assert_registered

SECRET = "s3cr3t-param"


@pytest.fixture(scope="module")
def mariadb():
    require_binary("mariadbd", "/usr/sbin/mariadbd")
    require_binary("mariadb-install-db")
    server = MariadbServer(env={"OTEL_SERVICE_NAME": "shop-mariadb"}).start()
    server.sql("CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(64), price INT)")
    yield server
    server.stop()


@pytest.fixture
def agent(otlp_receiver):
    a = AgentProcess("--targets", "mysql", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    a.start()
    yield a
    assert a.stop() == 0, a.output()


# The client runs in its own process, as an application would: the C extension needs
# static TLS room that libraries this test process already loaded (bcc's LLVM) have taken.
CLIENT = """
import json, sys
import mysql.connector
from mysql.connector.connection_cext import CMySQLConnection
cfg = json.loads(sys.argv[1])
conn = mysql.connector.connect(host=cfg["host"], port=cfg["port"], user="root", password="", database="shop",
                               use_pure=cfg["use_pure"], autocommit=True)
assert isinstance(conn, CMySQLConnection) != cfg["use_pure"], type(conn)
cur = conn.cursor(prepared=True)
errors = []
for sql, params in cfg["statements"]:
    try:
        cur.execute(sql, params)
        if cur.with_rows:
            cur.fetchall()
    except mysql.connector.Error as exc:
        errors.append(exc.errno)
cur.close()
conn.close()
print(json.dumps(errors))
"""


def run_client(server: MariadbServer, use_pure: bool, statements: list) -> list[int]:
    args = server.connect_args("shop")
    cfg = {"host": args["host"], "port": args["port"], "use_pure": use_pure, "statements": statements}
    r = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def spans_of(otlp_receiver, server, count: int, match, settle: float = 1.0) -> list:
    mine = lambda s: s.resource.get("process.pid") == server.pid and match(s)  # noqa: E731
    otlp_receiver.wait_for_spans(mine, count)
    time.sleep(settle)
    return [s for s in otlp_receiver.spans() if mine(s)]


def has(text: str):
    return lambda s: text in s.attributes.get("db.query.text", "")


@pytest.mark.parametrize("use_pure", [True, False], ids=["pure", "c-extension"])
def test_prepared_cursor_gives_one_span_per_execute(mariadb, agent, otlp_receiver, use_pure):
    mariadb.sql("DELETE FROM shop.items")
    before = otlp_receiver.db_duration_counts("mariadb")
    statements = [("INSERT INTO items (id, name, price) VALUES (?, ?, ?)", [i, f"{SECRET}-{i}", i * 10])
                  for i in range(30)]
    statements += [("SELECT name FROM items WHERE id = ? AND name <> ?", [i, SECRET]) for i in range(20)]
    assert run_client(mariadb, use_pure, statements) == []
    inserts = spans_of(otlp_receiver, mariadb, 30, has("INSERT INTO items"))
    selects = spans_of(otlp_receiver, mariadb, 20, has("SELECT name FROM items"))
    assert len(inserts) == 30 and len(selects) == 20
    assert {s.attributes["db.query.text"] for s in inserts} == {"INSERT INTO items (id, name, price) VALUES (?)"}
    assert {s.attributes["db.query.text"] for s in selects} == {"SELECT name FROM items WHERE id = ? AND name <> ?"}
    for s in inserts + selects:
        assert s.kind == 2 and s.status_code == 0
        assert s.attributes["db.system.name"] == "mariadb" and s.attributes["db.namespace"] == "shop"
        assert s.resource["service.name"] == "shop-mariadb"
    assert {s.name for s in inserts} == {"INSERT items"} and {s.name for s in selects} == {"SELECT items"}
    assert SECRET not in otlp_receiver.all_exported_text()
    assert_registered(inserts + selects)
    time.sleep(1.2)
    after = otlp_receiver.db_duration_counts("mariadb")
    assert after.get(("INSERT", None), 0) - before.get(("INSERT", None), 0) == 30
    # The driver (and the mysql client of the set-up) run SELECTs of their own: this agent
    # started with the test and every SELECT is a span at this rate, so the two agree.
    all_selects = spans_of(otlp_receiver, mariadb, 20, lambda s: s.attributes.get("db.operation.name") == "SELECT",
                           settle=0)
    assert after.get(("SELECT", None), 0) == len(all_selects), [s.attributes["db.query.text"] for s in all_selects]


def test_a_failing_prepared_execute_and_a_failing_prepare(mariadb, agent, otlp_receiver):
    mariadb.sql("DELETE FROM shop.items; INSERT INTO shop.items VALUES (1, 'one', 1)")
    errors = run_client(mariadb, True, [("INSERT INTO items (id, name) VALUES (?, ?)", [1, SECRET]),
                                        ("SELEC name FROM items WHERE id = ?", [1]),
                                        ("SELECT name FROM items WHERE id = ?", [1])])
    assert errors == [1062, 1064]
    dup = spans_of(otlp_receiver, mariadb, 1, has("INSERT INTO items (id, name)"))
    bad = spans_of(otlp_receiver, mariadb, 1, has("SELEC name"))
    ok = spans_of(otlp_receiver, mariadb, 1, has("SELECT name FROM items WHERE id = ?"))
    assert len(dup) == 1 and dup[0].status_code == 2 and dup[0].attributes["error.type"] == "1062"
    assert dup[0].attributes["db.response.status_code"] == "1062"
    assert len(bad) == 1 and bad[0].status_code == 2 and bad[0].attributes["error.type"] == "1064"
    assert len(ok) == 1 and ok[0].status_code == 0
    assert SECRET not in otlp_receiver.all_exported_text()


def test_text_protocol_and_sql_level_prepare_stay_one_span_each(mariadb, agent, otlp_receiver):
    import pymysql
    conn = pymysql.connect(**mariadb.connect_args("shop"), autocommit=True)
    with conn.cursor() as cur:
        cur.execute("PREPARE p FROM 'SELECT name FROM items WHERE id = ?'")
        cur.execute("SET @id = 1")
        for _ in range(3):
            cur.execute("EXECUTE p USING @id")
        cur.execute("DEALLOCATE PREPARE p")
    conn.close()
    spans = spans_of(otlp_receiver, mariadb, 3, has("EXECUTE p"))
    assert len(spans) == 3 and {s.attributes["db.query.text"] for s in spans} == {"EXECUTE p USING @id"}
