"""MySQL/MariaDB end to end: real kernel probes, real agent, real OTLP.

Two ways in, both proven here:
- uprobes on dispatch_command: a throwaway MariaDB 10.11 (no USDT) driven with pymysql;
- USDT: usdt/mysql_usdt_test.c, built here, fires mysql:query__start/query__done with
  MySQL 5.x's argument types and semaphores, as a MySQL server built with DTrace would.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from importlib import resources

import pytest

from otel_ebpf.elf import elf_info
from otel_ebpf.servers.mariadb import MariadbServer
from tests.support import procmem
from tests.support.agent import AgentProcess
from tests.support.semconv import assert_registered
from tests.support.prereq import require, require_binary

DISPATCH = "_Z16dispatch_command19enum_server_commandP3THDPcjb"
METRIC = "db.server.operation.duration"
CONNECTIONS = 4
QUERIES_PER_CONNECTION = 10
# What pymysql (1.1) sends by itself right after the handshake with autocommit=True
# (the server's default, so no SET AUTOCOMMIT): one query per connection.
CONNECT_QUERY = "SET NAMES utf8mb4"


@contextlib.contextmanager
def running(agent: AgentProcess):
    """The agent for the block; stopped also when it never got healthy (start() raised)."""
    try:
        agent.start()
        yield agent
    finally:
        if agent.proc is not None:
            agent.stop()


def pymysql_module():
    try:
        import pymysql
    except ImportError:
        pymysql = None
    require(pymysql is not None, "pymysql is not installed (pip install PyMySQL)")
    return pymysql


@pytest.fixture(scope="module")
def mariadb():
    require_binary("mariadbd", "/usr/sbin/mariadbd")
    require_binary("mariadb-install-db")
    pymysql = pymysql_module()
    server = MariadbServer(env={"OTEL_SERVICE_NAME": "shop-mariadb"}).start()
    try:
        server.sql("CREATE DATABASE shop; CREATE DATABASE inventory; "
                   "CREATE TABLE shop.orders (id INT PRIMARY KEY, customer VARCHAR(64), total DECIMAL(10,2)); "
                   "CREATE TABLE inventory.stock (sku VARCHAR(64) PRIMARY KEY, qty INT)")
        conn = pymysql.connect(**server.connect_args("shop"), autocommit=True)
        with conn.cursor() as cur:  # a body with semicolons: easier through a driver than the client
            cur.execute("CREATE PROCEDURE swallow_error() BEGIN "
                        "DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END; "
                        "INSERT INTO orders (id) VALUES (NULL); END")
        conn.close()
        yield server
    finally:
        server.stop()


def connect(server: MariadbServer, db: str = "shop", **kw):
    return pymysql_module().connect(**server.connect_args(db), autocommit=True, **kw)


def dispatch_site_byte(server: MariadbServer) -> bytes:
    """First byte of dispatch_command in the running server: 0xcc while a uprobe sits there."""
    sym = elf_info(server.mariadbd).symbol(DISPATCH)
    base = procmem.load_base(server.pid, os.path.realpath(server.mariadbd))
    return procmem.read(server.pid, base + sym.vaddr, 1)


def last_histograms(receiver, system: str) -> dict[tuple, object]:
    """The latest cumulative point of every attribute set of the duration metric."""
    latest = {}
    for _resource, point, attrs in receiver.metric_points(METRIC):
        if attrs.get("db.system.name") == system:
            latest[tuple(sorted(attrs.items()))] = point
    return latest


def run_workload(server: MariadbServer) -> list[str]:
    """Queries over several connections opened after the agent is healthy; returns every
    COM_QUERY sent, in order (the connect-time SET NAMES not included)."""
    pymysql = pymysql_module()
    sent: list[str] = []
    conns = [connect(server) for _ in range(CONNECTIONS)]

    def run(conn, query: str) -> None:
        with conn.cursor() as cur:
            cur.execute(query)
        sent.append(query)

    for i in range(QUERIES_PER_CONNECTION):
        for n, conn in enumerate(conns):
            key = i * CONNECTIONS + n
            run(conn, f"INSERT INTO orders (id, customer, total) VALUES ({key}, 'secret-customer-{key}', {key}.5)"
                if i % 2 == 0 else
                f"SELECT customer FROM orders WHERE id = {key - CONNECTIONS} AND customer <> 'secret-x{key}'")
    run(conns[0], "SELECT SLEEP(0.2)")
    with pytest.raises(pymysql.err.ProgrammingError) as syntax:
        run(conns[0], "SELEC customer FROM orders WHERE customer = 'secret-pw-1'")
    sent.append("syntax error")
    assert syntax.value.args[0] == 1064
    with pytest.raises(pymysql.err.IntegrityError) as duplicate:
        run(conns[0], "INSERT INTO orders (id, customer) VALUES (0, 'secret-dup')")
    sent.append("duplicate")
    assert duplicate.value.args[0] == 1062
    conns[1].select_db("inventory")  # COM_INIT_DB: no span, but the connection's database changes
    run(conns[1], "SELECT qty FROM stock WHERE sku = \"secret-sku-1\"")
    run(conns[2], "USE inventory")  # the statement runs in shop; the next one in inventory
    run(conns[2], "SELECT qty FROM stock WHERE sku = 'secret-sku-2'")
    conns[3].ping()  # COM_PING: no span
    for conn in conns:
        conn.close()  # COM_QUIT: no span
    return sent


def test_query_spans_and_kernel_histograms(mariadb, otlp_receiver):
    mariadb.sql("TRUNCATE TABLE orders", db="shop")
    agent = AgentProcess("--targets", "mysql", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    mine = lambda s: s.resource.get("process.pid") == mariadb.pid  # noqa: E731
    with running(agent):
        assert dispatch_site_byte(mariadb) == b"\xcc", "a uprobe should sit at dispatch_command"
        status = agent.health()[1]
        (unit,) = [t for t in status["targets"] if t["target"] == "mysql" and t["path"] == mariadb.mariadbd]
        assert set(unit["probes"]) == {"dispatch_command()", "dispatch_command() return", "THD::set_db()",
                                       "THD::reset_db()", "Protocol::net_send_error_packet()",
                                       "Prepared_statement::prepare()", "Prepared_statement::execute_loop()"}, unit

        sent = run_workload(mariadb)
        expected = len(sent) + CONNECTIONS  # + each connection's SET NAMES
        otlp_receiver.wait_for_spans(mine, expected)
        time.sleep(1.0)  # anything extra would arrive now
        spans = [s for s in otlp_receiver.spans() if mine(s)]
    assert agent.returncode == 0, agent.output()
    assert agent.stop_seconds is not None and agent.stop_seconds < 5.0
    assert dispatch_site_byte(mariadb) != b"\xcc", "detached: the original instruction is back"
    assert len(spans) == expected, sorted(s.attributes.get("db.query.text") for s in spans)

    by_text: dict[str, list] = {}
    for s in spans:
        assert s.kind == 2  # SERVER
        assert s.attributes["db.system.name"] == "mariadb"
        assert s.resource["service.name"] == "shop-mariadb"
        assert s.resource["process.executable.name"] == "mariadbd"
        assert time.time_ns() - 300e9 < s.start_ns < s.end_ns
        by_text.setdefault(s.attributes["db.query.text"], []).append(s)

    connect_spans = by_text.pop(CONNECT_QUERY)
    assert len(connect_spans) == CONNECTIONS
    assert all(s.attributes["db.namespace"] == "shop" for s in connect_spans), "the handshake's database"
    inserts = by_text.pop("INSERT INTO orders (id, customer, total) VALUES (?)")
    assert len(inserts) == CONNECTIONS * QUERIES_PER_CONNECTION // 2
    assert all(s.name == "INSERT orders" and s.status_code == 0 for s in inserts)
    assert all(s.attributes["db.namespace"] == "shop" and s.attributes["db.operation.name"] == "INSERT"
               for s in inserts)
    selects = by_text.pop("SELECT customer FROM orders WHERE id = ? AND customer <> ?")
    assert len(selects) == CONNECTIONS * QUERIES_PER_CONNECTION // 2
    assert all(s.name == "SELECT orders" and s.status_code == 0 for s in selects)

    (slow,) = by_text.pop("SELECT SLEEP(?)")
    assert 0.2 <= slow.duration_s < 1.0
    assert all(s.duration_s < 0.2 for s in inserts + selects)

    (syntax,) = by_text.pop("SELEC customer FROM orders WHERE customer = ?")
    assert syntax.status_code == 2
    assert syntax.attributes["db.response.status_code"] == "1064"
    assert syntax.attributes["error.type"] == "1064"
    (duplicate,) = by_text.pop("INSERT INTO orders (id, customer) VALUES (?)")
    assert duplicate.status_code == 2 and duplicate.attributes["error.type"] == "1062"
    assert duplicate.attributes["db.response.status_code"] == "1062"

    (use,) = by_text.pop("USE inventory")
    assert use.attributes["db.namespace"] == "shop"
    stock = by_text.pop("SELECT qty FROM stock WHERE sku = ?")
    assert len(stock) == 2 and all(s.attributes["db.namespace"] == "inventory" for s in stock), \
        "COM_INIT_DB and USE change the connection's database"
    assert not by_text, f"unexpected spans: {list(by_text)}"
    assert all(s.status_code == 0 for s in connect_spans + [use] + stock)

    assert "secret" not in otlp_receiver.all_exported_text(), "a literal left the agent"
    assert_registered(spans)

    # The kernel's histograms count every query, exactly once (the final export follows the detach).
    hists = last_histograms(otlp_receiver, "mariadb")
    assert sum(p.count for p in hists.values()) == expected
    by_attrs = {dict(k).get("error.type", ""): p for k, p in hists.items() if dict(k).get("error.type")}
    assert set(by_attrs) == {"1064", "1062"}
    assert by_attrs["1064"].count == 1 and by_attrs["1062"].count == 1
    selects_hist = {k: p for k, p in hists.items()
                    if dict(k)["db.operation.name"] == "SELECT" and "error.type" not in dict(k)}
    (select_point,) = selects_hist.values()
    assert select_point.count == len(selects) + 1 + len(stock)  # + SLEEP
    assert select_point.sum >= 0.2
    assert sum(select_point.bucket_counts[6:]) == 1, "only the 0.2 s SLEEP is in (0.1, 0.25] or above"


def test_multi_statement_packets_and_swallowed_errors(mariadb, otlp_receiver):
    from pymysql.constants import CLIENT
    pymysql = pymysql_module()
    agent = AgentProcess("--targets", "mysql", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    mine = lambda s: s.resource.get("process.pid") == mariadb.pid  # noqa: E731
    with running(agent):
        conn = connect(mariadb, client_flag=CLIENT.MULTI_STATEMENTS)
        with conn.cursor() as cur:
            cur.execute("SELECT 'secret-m1'; SELECT 'secret-m2'")
            while cur.nextset():
                pass
            with pytest.raises(pymysql.err.ProgrammingError) as missing:
                cur.execute("SELECT 1; SELECT * FROM no_such_table; SELECT 3")
                while cur.nextset():
                    pass
            assert missing.value.args[0] == 1146
        conn.close()
        conn = connect(mariadb)
        with conn.cursor() as cur:
            cur.execute("INSERT IGNORE INTO orders (id, customer) VALUES (-1, 'secret-ig'), (-1, 'secret-ig2')")
            cur.execute("DROP TABLE IF EXISTS no_such_table")
            cur.execute("CALL swallow_error()")
        conn.close()
        expected = 2 * 1 + 2 + 3  # SET NAMES per connection, then the packets
        otlp_receiver.wait_for_spans(mine, expected)
        time.sleep(1.0)
        spans = [s for s in otlp_receiver.spans() if mine(s)]
    assert len(spans) == expected, [s.attributes["db.query.text"] for s in spans]
    by_text = {s.attributes["db.query.text"]: s for s in spans}
    assert sorted(by_text) == sorted([
        CONNECT_QUERY, "SELECT ?; SELECT ?", "SELECT ?; SELECT * FROM no_such_table; SELECT ?",
        "INSERT IGNORE INTO orders (id, customer) VALUES (?)", "DROP TABLE IF EXISTS no_such_table",
        "CALL swallow_error()"])
    failed = [s for s in spans if s.status_code == 2]
    assert [s.attributes["db.query.text"] for s in failed] == ["SELECT ?; SELECT * FROM no_such_table; SELECT ?"]
    assert failed[0].attributes["error.type"] == "1146"
    assert all("error.type" not in s.attributes for s in spans if s.status_code != 2), \
        "warnings, notes and errors a handler swallowed are no failure"
    assert "secret" not in otlp_receiver.all_exported_text()


def test_kernel_sampling_keeps_histograms_exact(mariadb, otlp_receiver):
    agent = AgentProcess("--targets", "mysql", "--sample-ratio", "0", "--slow-threshold-ms", "100",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    mine = lambda s: s.resource.get("process.pid") == mariadb.pid  # noqa: E731
    pymysql = pymysql_module()
    fast = 30
    with running(agent):
        conn = connect(mariadb)
        with conn.cursor() as cur:
            for i in range(fast):
                cur.execute(f"SELECT {i}")
            cur.execute("SELECT SLEEP(0.15)")
            with pytest.raises(pymysql.err.ProgrammingError):
                cur.execute("SELECT * FROM no_such_table")
        conn.close()
        otlp_receiver.wait_for_spans(mine, 2)
        time.sleep(1.0)
    spans = [s for s in otlp_receiver.spans() if mine(s)]
    assert sorted(s.attributes["db.query.text"] for s in spans) == ["SELECT * FROM no_such_table", "SELECT SLEEP(?)"]
    hists = last_histograms(otlp_receiver, "mariadb")
    assert sum(p.count for p in hists.values()) == fast + 3  # + SET NAMES, SLEEP, failing
    sampled_out = [p for _r, p, attrs in otlp_receiver.metric_points("otel_ebpf.spans.sampled_out")
                   if attrs.get("target") == "mysql"]
    assert sampled_out and sampled_out[-1].as_int == fast + 1


# --- the USDT path ---------------------------------------------------------------------


class UsdtProgram:
    """usdt/mysql_usdt_test running, fed one query per line."""

    def __init__(self, path: str):
        self.proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.path = path

    def send(self, query: str, *, db: str = "shop", connid: int = 1, sleep_ms: int = 0, status: int = 0,
             errno: int = 0, user: str = "app", host: str = "10.0.0.7") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{connid}\t{db or '-'}\t{user}\t{host}\t{sleep_ms}\t{status}\t{errno}\t{query}\n")
        self.proc.stdin.flush()

    def wait_done(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ok "), line

    def query(self, query: str, **kw) -> None:
        self.send(query, **kw)
        self.wait_done()

    def semaphore(self, probe: str) -> int:
        site = elf_info(self.path).usdt("mysql", probe)[0]
        base = procmem.load_base(self.pid, os.path.basename(self.path))
        return int.from_bytes(procmem.read(self.pid, base + site.semaphore, 2), "little")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def usdt_binary(tmp_path_factory) -> str:
    gcc = require_binary("gcc")
    require(any(os.path.exists(p) for p in ("/usr/include/sys/sdt.h", "/usr/include/x86_64-linux-gnu/sys/sdt.h")),
            "sys/sdt.h is missing: apt-get install systemtap-sdt-dev")
    source = resources.files("otel_ebpf.usdt") / "mysql_usdt_test.c"
    out = tmp_path_factory.mktemp("mysql-usdt") / "mysql_usdt_test"
    subprocess.run([gcc, "-O2", "-o", str(out), str(source)], check=True, capture_output=True)
    return str(out)


def test_usdt_probes_of_a_dtrace_build(usdt_binary, otlp_receiver):
    slow_one, other = UsdtProgram(usdt_binary), UsdtProgram(usdt_binary)
    try:
        other.query("SELECT 'secret-before' FROM orders")  # no tracer yet: the semaphore keeps it silent
        agent = AgentProcess("--targets", "mysql", "--binary", f"mysql={usdt_binary}",
                             env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
        pids = {slow_one.pid, other.pid}
        mine = lambda s: s.resource.get("process.pid") in pids  # noqa: E731
        with running(agent):
            (unit,) = [t for t in agent.health()[1]["targets"] if t["path"] == usdt_binary]
            assert sorted(unit["probes"]) == ["my_message_sql()", "mysql:query__done", "mysql:query__start"]
            assert slow_one.semaphore("query__start") >= 1 and slow_one.semaphore("query__done") >= 1

            # Paired by thread: fast queries in another process finish while the slow one runs.
            slow_one.send("SELECT * FROM orders WHERE note = 'secret-slow'", sleep_ms=300, connid=7)
            for i in range(5):
                other.query(f"UPDATE stock SET qty = qty - 1 WHERE sku = 'secret-sku-{i}'", db="inventory",
                            connid=8, sleep_ms=2)
            other.query("SELECT * FROM missing WHERE a = 'secret-f'", connid=8, status=1, errno=1146)
            other.query("INSERT IGNORE INTO t VALUES (1, 'secret-i')", connid=8, errno=1062)  # swallowed
            other.query("DELETE FROM t WHERE a = 'secret-d'", connid=8, status=1)  # failed, no number known
            other.query("SHOW TABLES", db="", connid=9)
            slow_one.wait_done()
            sent = 1 + 5 + 4
            otlp_receiver.wait_for_spans(mine, sent)
            time.sleep(1.0)
            spans = [s for s in otlp_receiver.spans() if mine(s)]
        assert agent.returncode == 0, agent.output()
        assert slow_one.semaphore("query__start") == 0, "detached: the kernel lowered the semaphore"
    finally:
        slow_one.close()
        other.close()

    assert len(spans) == sent, [s.attributes.get("db.query.text") for s in spans]
    for s in spans:
        assert s.kind == 2 and s.attributes["db.system.name"] == "mysql"
        assert s.resource["process.executable.name"] == "mysql_usdt_test"
    by_text = {}
    for s in spans:
        by_text.setdefault(s.attributes["db.query.text"], []).append(s)

    (slow,) = by_text["SELECT * FROM orders WHERE note = ?"]
    assert slow.resource["process.pid"] == slow_one.pid
    assert slow.attributes["db.namespace"] == "shop" and slow.name == "SELECT orders"
    assert 0.3 <= slow.duration_s < 1.0 and slow.status_code == 0
    updates = by_text["UPDATE stock SET qty = qty - ? WHERE sku = ?"]
    assert len(updates) == 5
    assert all(s.attributes["db.namespace"] == "inventory" and 0.002 <= s.duration_s < 0.2 for s in updates)
    assert all(s.resource["process.pid"] == other.pid and s.status_code == 0 for s in updates)
    (failed,) = by_text["SELECT * FROM missing WHERE a = ?"]
    assert failed.status_code == 2 and failed.attributes["error.type"] == "1146"
    assert failed.attributes["db.response.status_code"] == "1146"
    (swallowed,) = by_text["INSERT IGNORE INTO t VALUES (?)"]
    assert swallowed.status_code == 0 and "error.type" not in swallowed.attributes
    (unnumbered,) = by_text["DELETE FROM t WHERE a = ?"]
    assert unnumbered.status_code == 2 and unnumbered.attributes["error.type"] == "_OTHER"
    assert "db.response.status_code" not in unnumbered.attributes
    (show,) = by_text["SHOW TABLES"]
    assert "db.namespace" not in show.attributes

    assert "secret" not in otlp_receiver.all_exported_text()
    assert_registered(spans)
    hists = last_histograms(otlp_receiver, "mysql")
    assert sum(p.count for p in hists.values()) == sent
    errors = sorted(dict(k).get("error.type", "") for k, p in hists.items() for _ in range(p.count))
    assert errors.count("1146") == 1 and errors.count("_OTHER") == 1 and errors.count("") == sent - 2


@pytest.mark.parametrize("layout, track_init_db", [(2, 1), (1, 1)], ids=["com_data", "init_db_tracking"])
def test_paths_without_a_server_here_pass_the_verifier(usdt_binary, layout, track_init_db):
    """MySQL 8's layout and the COM_INIT_DB fallback have no server here: prove at least that
    the kernel accepts their programs (loading happens at attach)."""
    from otel_ebpf import bpf
    from otel_ebpf.attacher import agent_cflags
    from otel_ebpf.config import Config
    from otel_ebpf.targets.mysql import MysqlTarget

    require_binary("mariadbd", "/usr/sbin/mariadbd")
    plan = MysqlTarget().plan("/usr/sbin/mariadbd", Config())
    cflags = [f for f in plan.cflags if not f.startswith(("-DDISPATCH_LAYOUT=", "-DTRACK_INIT_DB="))]
    program = bpf.compile_program("mysql-verifier", "mysql.c",
                                  [*cflags, *agent_cflags(Config()), f"-DDISPATCH_LAYOUT={layout}",
                                   f"-DTRACK_INIT_DB={track_init_db}"])
    harmless = elf_info(usdt_binary).symbol("my_message_sql").file_offset  # nothing runs it meanwhile
    try:
        functions = ("on_dispatch_enter", "on_dispatch_return", "on_error_sent", "on_error_raised", "on_set_db",
                     "on_stmt_prepare", "on_stmt_execute")
        for fn in functions:
            program.attach_uprobe(fn, usdt_binary, harmless, retprobe=fn == "on_dispatch_return", label=fn)
        assert len(program.attachments) == len(functions)
    finally:
        program.close()


def test_restarted_server_keeps_its_spans_without_restarting_the_agent(otlp_receiver):
    """mariadbd stopped and started again (a new process of the same binary, as after
    `systemctl restart mariadb`): its queries keep their spans and histogram counts."""
    require_binary("mariadbd", "/usr/sbin/mariadbd")
    server = MariadbServer().start()
    agent = AgentProcess("--targets", "mysql", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    try:
        with running(agent):
            first_pid = server.pid
            conn = connect(server, db=None)
            with conn.cursor() as cur:
                for i in range(7):
                    cur.execute(f"SELECT {i} AS before_restart")
            conn.close()
            before = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == first_pid,
                                                  7 + 1)  # + pymysql's SET NAMES
            server.restart()
            assert server.pid != first_pid
            conn = connect(server, db=None)
            with conn.cursor() as cur:
                for i in range(9):
                    cur.execute(f"SELECT {i} AS after_restart")
            conn.close()
            after = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == server.pid, 9 + 1)
            time.sleep(1.5)  # anything extra, and the next cumulative histogram, arrive now
            total = sum(p.count for p in last_histograms(otlp_receiver, "mariadb").values())
            status = agent.health()[1]
            restarts_seen = [s for s in otlp_receiver.spans()
                             if s.resource.get("process.pid") in (first_pid, server.pid)]
    finally:
        server.stop()
    assert agent.returncode == 0, agent.output()
    assert sorted(s.attributes["db.query.text"] for s in before if "before_restart" in s.attributes["db.query.text"]) \
        == ["SELECT ? AS before_restart"] * 7
    assert sorted(s.attributes["db.query.text"] for s in after if "after_restart" in s.attributes["db.query.text"]) \
        == ["SELECT ? AS after_restart"] * 9
    assert len(restarts_seen) == 7 + 1 + 9 + 1
    assert total == 7 + 1 + 9 + 1, "the kernel histogram counts both servers' queries (no other is busy)"
    assert status["attach_failures"] == 0 and status["events_lost"] == 0
