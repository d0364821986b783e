"""The USDT catalog end to end: entries of usdt/catalog/*.yaml turned into spans and exact
kernel histograms with no code per provider: the test program, CPython's garbage
collector and imports, PostgreSQL's lock waits and checkpoints; and a user's own file."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from otel_ebpf.servers.postgres import PostgresServer
from tests.support.agent import AgentProcess
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3.11"


@pytest.fixture(scope="module")
def sdt_program(tmp_path_factory) -> str:
    require(shutil.which("cc") is not None, "a C compiler (gcc) is not installed")
    out = tmp_path_factory.mktemp("sdt") / "sdt_test_program"
    subprocess.run(["cc", "-O2", "-o", str(out), str(REPO / "usdt/sdt_test_program.c"),
                    str(REPO / "usdt/sdt_test_tick.c")], check=True, capture_output=True)
    return str(out)


def histogram_count(otlp_receiver, metric: str, **match) -> int:
    return sum(p.count for p in otlp_receiver.last_points(metric, **match).values())


def test_the_test_program_through_the_catalog(sdt_program, otlp_receiver):
    agent = AgentProcess("--targets", "usdt", "--binary", f"usdt={sdt_program}",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        status = agent.health("/readyz")[1]
        unit = next(t for t in status["targets"] if t["path"] == sdt_program)
        assert set(unit["probes"]) == {"otel_test:query__start", "otel_test:query__done"}, unit
        r = subprocess.run([sdt_program, "300", "SELECT 42"], capture_output=True, timeout=60)
        assert r.returncode == 0
        spans = otlp_receiver.wait_for_spans(lambda s: s.name == "test SELECT 42", 300)
        time.sleep(1.5)
    assert len(spans) == 300
    s = spans[0]
    assert s.kind == 2 and s.attributes["otel_ebpf.test.query"] == "SELECT 42"
    assert s.attributes["otel_ebpf.test.length"] == 9 and s.attributes["otel_ebpf.test.status"] == 0
    assert s.duration_s >= 0.001  # the program sleeps 1 ms between the two probes
    assert s.resource["process.executable.name"] == "sdt_test_program"
    assert histogram_count(otlp_receiver, "otel_ebpf.test.query.duration", **{"otel_ebpf.test.status": 0}) == 300


def test_python_garbage_collections_and_slow_imports(otlp_receiver, tmp_path):
    require(Path(PYTHON).exists(), f"{PYTHON} is not installed")
    slow_module = tmp_path / "slow_module_for_otel.py"
    slow_module.write_text("import time\ntime.sleep(0.05)\n")
    script = textwrap.dedent(f"""
        import gc, sys
        sys.path.insert(0, {str(tmp_path)!r})
        for _ in range(7):
            gc.collect(0)
        for _ in range(3):
            gc.collect(2)
        import slow_module_for_otel
    """)
    agent = AgentProcess("--targets", "usdt", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        r = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pid_spans = otlp_receiver.wait_for_spans(lambda s: s.name == "import slow_module_for_otel", 1)
        time.sleep(1.5)
    assert len(pid_spans) == 1 and pid_spans[0].duration_s >= 0.05
    assert pid_spans[0].kind == 1 and pid_spans[0].attributes["otel_ebpf.python.module"] == "slow_module_for_otel"
    gen0 = histogram_count(otlp_receiver, "otel_ebpf.cpython.gc.duration", **{"cpython.gc.generation": 0})
    gen2 = histogram_count(otlp_receiver, "otel_ebpf.cpython.gc.duration", **{"cpython.gc.generation": 2})
    assert gen0 >= 7 and gen2 >= 3  # and whatever the interpreter collects by itself
    assert agent.returncode == 0


def test_postgresql_lock_waits_and_checkpoints(otlp_receiver):
    pg = PostgresServer().start()
    try:
        pg.psql("CREATE TABLE accounts (id int PRIMARY KEY, balance int); INSERT INTO accounts VALUES (1, 0)")
        agent = AgentProcess("--targets", "usdt,postgres",
                             env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
        with agent:
            holder = psycopg2.connect(pg.dsn())
            with holder.cursor() as cur:
                cur.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
                waiter_done = threading.Event()

                def wait_for_lock() -> None:
                    conn = psycopg2.connect(pg.dsn())
                    conn.autocommit = True
                    with conn.cursor() as c:
                        c.execute("SELECT balance FROM accounts WHERE id = 1")
                    conn.close()
                    waiter_done.set()

                threading.Thread(target=wait_for_lock).start()
                time.sleep(0.4)
            holder.commit()  # the waiter gets its lock now
            assert waiter_done.wait(10)
            holder.close()
            pg.psql("CHECKPOINT")
            waits = otlp_receiver.wait_for_spans(lambda s: s.name.startswith("lock wait"), 1)
            checkpoints = otlp_receiver.wait_for_spans(lambda s: s.name == "checkpoint", 1)
            time.sleep(1.5)
    finally:
        pg.stop()
    (wait,) = waits
    assert wait.name == "lock wait AccessShareLock" and wait.duration_s >= 0.3
    assert wait.attributes["otel_ebpf.postgresql.lock.type"] == "relation"
    assert wait.resource["process.pid"] == pg.pid, "a backend's spans belong to its postmaster"
    assert len(checkpoints) >= 1
    assert histogram_count(otlp_receiver, "otel_ebpf.postgresql.lock.wait.duration",
                           **{"otel_ebpf.postgresql.lock.mode": "AccessShareLock"}) == 1


def test_a_users_catalog_file_and_a_bad_one(sdt_program, otlp_receiver, tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(textwrap.dedent("""\
        binaries:
          processes: [sdt_test_program]
          provider: otel_test
        pairs:
          - name: mine.query
            start: query__start
            done: query__done
            attributes:
              mine.id: {probe: start, arg: 2, type: int}
            span: {name: "mine {mine.id}"}
        """))
    agent = AgentProcess("--targets", "usdt", "--binary", f"usdt={sdt_program}", "--usdt-catalog", str(good),
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        subprocess.run([sdt_program, "3", "SELECT 1"], capture_output=True, timeout=60, check=True)
        mine = otlp_receiver.wait_for_spans(lambda s: s.name.startswith("mine "), 3)
    assert sorted(s.attributes["mine.id"] for s in mine) == [3, 10, 17]  # i * 7 + argc
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("query__done", "query__finish"))
    r = subprocess.run([sys.executable, "-m", "otel_ebpf.cli", "run", "--targets", "usdt", "--binary",
                        f"usdt={sdt_program}", "--usdt-catalog", str(bad), "--health-addr", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "otel_test:query__finish" in r.stderr and str(bad) in r.stderr
