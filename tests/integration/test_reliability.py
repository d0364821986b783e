"""Faults the agent must survive: a backend that is down, servers that restart or start
late, an agent killed with SIGKILL, processes killed mid-query, bad input, few privileges."""
from __future__ import annotations

import os
import signal
import threading
import time

import psycopg2
import pytest

from otel_ebpf.elf import elf_info
from otel_ebpf.servers.postgres import PostgresServer
from tests.support import procmem
from tests.support.agent import AgentProcess


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer().start()
    yield server
    server.stop()


def mine(pg):
    return lambda s: s.resource.get("process.pid") == pg.pid


def run_queries(pg, queries: list[str], db: str = "postgres") -> None:
    conn = psycopg2.connect(pg.dsn(db))
    conn.autocommit = True
    with conn.cursor() as cur:
        for q in queries:
            try:
                cur.execute(q)
            except psycopg2.Error:
                pass
    conn.close()


def test_backend_down_at_start_then_back(pg, otlp_receiver):
    otlp_receiver.available = False
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        run_queries(pg, [f"SELECT {i} AS down" for i in range(20)])
        time.sleep(2.0)  # the first export attempts fail and are retried
        otlp_receiver.available = True
        run_queries(pg, [f"SELECT {i} AS up" for i in range(20)])
        spans = otlp_receiver.wait_for_spans(mine(pg), 40, timeout=30)
        status = agent.health()[1]
    assert agent.returncode == 0
    assert len(spans) + status["spans_dropped"] == 40, "every span is delivered or counted as dropped"
    assert len(spans) == 40, "an outage shorter than the export timeout loses nothing"
    assert sum(otlp_receiver.db_duration_counts().values()) == 40, "cumulative metrics carry on across the outage"


def test_long_outage_drops_are_counted_and_memory_bounded(pg, otlp_receiver):
    otlp_receiver.available = False
    agent = AgentProcess("--targets", "postgres", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint, "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BSP_MAX_QUEUE_SIZE": "50", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10"})
    with agent:
        run_queries(pg, [f"SELECT {i} AS lost" for i in range(300)])
        time.sleep(4.0)
        during = agent.health()[1]
        otlp_receiver.available = True
        run_queries(pg, [f"SELECT {i} AS after" for i in range(10)])
        after = otlp_receiver.wait_for_spans(lambda s: mine(pg)(s) and "after" in s.attributes["db.query.text"], 10)
        time.sleep(1.5)
        status = agent.health()[1]
    spans = [s for s in otlp_receiver.spans() if mine(pg)(s)]
    assert during["queue_length"] <= 50, "the queue is bounded"
    assert during["spans_dropped"] > 0
    assert len(after) == 10, "spans flow again after the backend comes back"
    assert len(spans) + status["spans_dropped"] == 310
    assert sum(otlp_receiver.db_duration_counts().values()) == 310


def test_server_starts_after_agent_and_restarts(otlp_receiver):
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        server = PostgresServer().start()  # after the agent: new processes of an attached binary
        try:
            run_queries(server, ["SELECT 'before restart'"])
            assert len(otlp_receiver.wait_for_spans(mine(server), 1)) == 1
            server.restart()
            run_queries(server, ["SELECT 'after restart'", "SELECT 'after restart 2'"])
            spans = otlp_receiver.wait_for_spans(mine(server), 2)
        finally:
            server.stop()
    assert len(spans) == 2


def query_start_semaphore(pg) -> int:
    info = elf_info(pg.postgres)
    probe = info.usdt("postgresql", "query__start")[0]
    base = procmem.load_base(pg.pid, "/bin/postgres")
    return int.from_bytes(procmem.read(pg.pid, base + probe.semaphore, 2), "little")


def test_sigkill_leaves_nothing_and_next_start_works(pg, otlp_receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint}
    first = AgentProcess("--targets", "postgres", env=env).start()
    assert query_start_semaphore(pg) >= 1
    first.stop(signal.SIGKILL)
    time.sleep(0.5)
    assert query_start_semaphore(pg) == 0, "the kernel released the probes of a killed agent"
    with AgentProcess("--targets", "postgres", env=env):
        run_queries(pg, ["SELECT 'second life'"])
        spans = otlp_receiver.wait_for_spans(mine(pg), 1)
    assert len(spans) == 1


def test_backend_killed_mid_query_expires_as_unmatched(pg, otlp_receiver):
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        conn = psycopg2.connect(pg.dsn())
        conn.autocommit = True
        backend = conn.get_backend_pid()
        worker = threading.Thread(target=lambda: _swallow(conn, "SELECT pg_sleep(30)"))
        worker.start()
        time.sleep(1.0)
        os.kill(backend, signal.SIGKILL)  # no abort, no done: the start stays in the kernel map
        worker.join(30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and agent.health()[1]["starts_expired"] < 1:
            time.sleep(0.5)
        status = agent.health()[1]
    pg.pid = _wait_postmaster(pg)  # the postmaster reinitialised after the crash
    assert status["starts_expired"] >= 1


def _swallow(conn, q: str) -> None:
    try:
        with conn.cursor() as cur:
            cur.execute(q)
    except psycopg2.Error:
        pass


def _wait_postmaster(pg) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = psycopg2.connect(pg.dsn())
            conn.close()
            break
        except psycopg2.Error:
            time.sleep(0.5)
    with open(os.path.join(pg.data, "postmaster.pid")) as fh:
        return int(fh.readline())


def test_bad_queries_and_many_shapes(pg, otlp_receiver):
    pg.psql("CREATE DATABASE rawbytes ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    big = "SELECT '" + "x" * 1_000_000 + "secret-in-big' AS big"
    shapes = [f"SELECT * FROM missing_{i} WHERE token = 'secret-{i}'" for i in range(10_000)]
    agent = AgentProcess("--targets", "postgres", "--slow-threshold-ms", "0",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        run_queries(pg, [big, "-- only a comment", "/* also only a comment */"])
        conn = psycopg2.connect(pg.dsn("rawbytes"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(b"SELECT '\xff\xfe secret-latin1 \xe9' AS raw")
        conn.close()
        run_queries(pg, shapes)
        spans = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == pg.pid, 10_004, timeout=60)
        time.sleep(1.5)
        healthy = agent.health()
    assert healthy[0] == 200 and agent.returncode in (None, 0)
    assert agent.returncode == 0
    assert len(spans) == 10_004
    assert "secret" not in otlp_receiver.all_exported_text()
    texts = [s.attributes.get("db.query.text", "") for s in spans]
    assert "SELECT ? AS big" in texts or any(t.startswith("SELECT ?") for t in texts)
    assert "SELECT ? AS raw" in texts
    # 10,000 query shapes: the per-summary slow counter stays bounded, its total stays exact.
    series = {tuple(sorted(a.items())) for _r, _p, a in otlp_receiver.metric_points("otel_ebpf.db.slow_operations")}
    assert len(series) <= 2001
    assert otlp_receiver.counter_total("otel_ebpf.db.slow_operations") == 10_004


def test_500_concurrent_connections(pg, otlp_receiver):
    n = 500
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        conns = [psycopg2.connect(pg.dsn()) for _ in range(n)]
        for c in conns:
            c.autocommit = True
        barrier = threading.Barrier(n)

        def one(i: int) -> None:
            barrier.wait()
            with conns[i].cursor() as cur:
                cur.execute(f"SELECT {i} AS concurrent")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in conns:
            c.close()
        spans = otlp_receiver.wait_for_spans(mine(pg), n, timeout=60)
        time.sleep(1.0)
        spans = [s for s in otlp_receiver.spans() if mine(pg)(s)]
    assert len(spans) == n
    assert {s.attributes["client.port"] for s in spans}.__len__() == n


def test_missing_configured_binary_is_a_warning(pg, otlp_receiver):
    agent = AgentProcess("--targets", "postgres", "--binary", "postgres=/nonexistent/postgres",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        run_queries(pg, ["SELECT 'still works'"])
        spans = otlp_receiver.wait_for_spans(mine(pg), 1)
    assert len(spans) == 1
    assert "/nonexistent/postgres does not exist" in agent.output()


LEAST = "bpf,+perfmon,+sys_ptrace,+dac_override"


def test_runs_with_least_privilege(pg, otlp_receiver):
    """As user nobody with only CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_DAC_OVERRIDE."""
    caps = [f"--inh-caps=-all,+{LEAST}", f"--ambient-caps=-all,+{LEAST}", f"--bounding-set=-all,+{LEAST}"]
    agent = AgentProcess("--targets", "postgres", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    agent.prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *caps, "--"]
    with agent:
        run_queries(pg, ["SELECT 'least privilege'"])
        spans = otlp_receiver.wait_for_spans(mine(pg), 1)
    assert len(spans) == 1 and spans[0].resource["service.name"] == "postgres"
    assert agent.returncode == 0
    # Without CAP_SYS_ADMIN the probes were made through tracefs: they must be gone too.
    with open("/sys/kernel/tracing/uprobe_events") as fh:
        assert f"_otel_ebpf_{agent.proc.pid}_" not in fh.read()


def test_binary_replaced_by_a_new_file_is_attached_again(tmp_path, otlp_receiver):
    """An upgrade replaces the binary (new inode): the rescan attaches the new file, and
    processes still running the old one stay traced."""
    import shutil
    import subprocess
    from importlib import resources

    from tests.integration.test_mysql import UsdtProgram
    from tests.support.prereq import require_binary

    gcc = require_binary("gcc")
    path = str(tmp_path / "mysqld_usdt")
    source = resources.files("otel_ebpf.usdt") / "mysql_usdt_test.c"
    subprocess.run([gcc, "-O2", "-o", path, str(source)], check=True, capture_output=True)
    config = tmp_path / "agent.yaml"
    config.write_text("rescan_interval_s: 0.5\n")
    agent = AgentProcess("--targets", "mysql", "--binary", f"mysql={path}", "--config", str(config),
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    old = new = None
    try:
        with agent:
            old = UsdtProgram(path)
            old.query("SELECT 'old binary' FROM a")
            shutil.copy(path, path + ".new")
            os.rename(path + ".new", path)  # what a package upgrade does: a new file, a new inode
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                # both files fully attached (probes are listed as they attach, one by one)
                units = [t for t in agent.health()[1]["targets"] if t["path"] == path and len(t["probes"]) == 3]
                if len(units) >= 2:
                    break
                time.sleep(0.2)
            assert len(units) >= 2, agent.health()[1]
            new = UsdtProgram(path)
            new.query("SELECT 'new binary' FROM b")
            old.query("SELECT 'old binary again' FROM c")
            pids = {old.pid, new.pid}
            spans = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") in pids, 3)
    finally:
        for p in (old, new):
            if p is not None:
                p.close()
    assert sorted(s.name for s in spans) == ["SELECT a", "SELECT b", "SELECT c"]
