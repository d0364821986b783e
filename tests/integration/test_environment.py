"""The agent's environment as users set it, one variable at a time, through a real OTLP
receiver: the standard OTEL_* variables, identity (service.instance.id, host.*), health
for orchestrators, and discovery selectors."""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
import urllib.request

import psycopg2
import pytest

from otel_ebpf.servers import free_port
from otel_ebpf.servers.postgres import PostgresServer
from tests.support.agent import AgentProcess


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(env={"OTEL_SERVICE_NAME": "orders-db",
                                 "OTEL_RESOURCE_ATTRIBUTES": "service.namespace=shop,team=%20payments"}).start()
    yield server
    server.stop()


def query(pg, n: int = 3, text: str = "SELECT 1") -> None:
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        for _ in range(n):
            cur.execute(text)
    conn.close()


def mine(pg):
    return lambda s: s.resource.get("process.pid") == pg.pid


def agent_with(otlp_receiver, *args: str, health_port: int | None = None, **env: str) -> AgentProcess:
    return AgentProcess("--targets", "postgres", *args, health_port=health_port,
                        env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint, **env})


def agent_resources(otlp_receiver) -> list[dict]:
    out = []
    for req in otlp_receiver.metric_requests:
        for rm in req.resource_metrics:
            out.append({kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in rm.resource.attributes})
    return out


def test_resource_attributes_merge_into_every_watched_process(pg, otlp_receiver):
    with agent_with(otlp_receiver, OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=prod,host.name=node-7",
                    OTEL_SERVICE_NAME="edge-agent"):
        query(pg)
        spans = otlp_receiver.wait_for_spans(mine(pg), 3)
        time.sleep(1.5)
    r = spans[0].resource
    assert r["deployment.environment.name"] == "prod" and r["host.name"] == "node-7"
    assert r["service.name"] == "orders-db", "the process's own OTEL_SERVICE_NAME wins"
    assert r["service.namespace"] == "shop" and r["team"] == " payments", "its own OTEL_RESOURCE_ATTRIBUTES too"
    assert "service.instance.id" not in r, "the agent's identity is not the watched process's"
    agent = agent_resources(otlp_receiver)[-1]
    assert agent["service.name"] == "edge-agent" and agent["deployment.environment.name"] == "prod"
    assert agent["host.name"] == "node-7"


def test_identity_is_stable_across_restarts_and_names_the_host(pg, otlp_receiver):
    port = free_port()
    ids = []
    for _ in range(2):
        with agent_with(otlp_receiver, health_port=port) as agent:
            ids.append(agent.health()[1]["service.instance.id"])
            time.sleep(1.3)
    assert ids[0] == ids[1] and len(ids[0]) == 36
    resource = agent_resources(otlp_receiver)[-1]
    assert resource["service.instance.id"] == ids[0]
    assert resource["host.name"] == socket.gethostname()
    with open("/etc/machine-id") as fh:
        assert resource["host.id"] == fh.read().strip()


def test_two_agents_keep_their_series_apart(pg, otlp_receiver):
    """Two agents (two hosts, say) into one receiver: each metric point carries its agent's
    service.instance.id, so the collector's Prometheus exporter (job/instance from
    service.name/service.instance.id) keeps the series apart."""
    a = agent_with(otlp_receiver).start()
    b = agent_with(otlp_receiver).start()
    try:
        query(pg, 5)
        time.sleep(2.5)
        id_a, id_b = a.health()[1]["service.instance.id"], b.health()[1]["service.instance.id"]
    finally:
        a.stop()
        b.stop()
    assert id_a != id_b
    by_instance: dict[str, int] = {}
    for resource, point, attrs in otlp_receiver.metric_points("db.server.operation.duration"):
        by_instance[resource["service.instance.id"]] = point.count
    assert by_instance.get(id_a, 0) >= 5 and by_instance.get(id_b, 0) >= 5


@pytest.mark.parametrize("variable,value", [("OTEL_TRACES_EXPORTER", "none"), ("OTEL_SDK_DISABLED", "true")])
def test_no_spans_when_told_so(pg, otlp_receiver, variable, value):
    with agent_with(otlp_receiver, **{variable: value}) as agent:
        query(pg)
        time.sleep(2.0)
        status = agent.health("/readyz")[1]
    assert [s for s in otlp_receiver.spans() if mine(pg)(s)] == []
    if variable == "OTEL_SDK_DISABLED":
        assert status["status"] == "disabled" and status["probes_attached"] == 0
        assert otlp_receiver.metric_requests == []
    else:
        assert otlp_receiver.metric_requests, "metrics still go out"


def test_metrics_only_through_their_own_endpoint(pg, otlp_receiver):
    agent = AgentProcess("--targets", "postgres",
                         env={"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        query(pg)
        time.sleep(2.0)
    assert otlp_receiver.db_duration_counts("postgresql").get(("SELECT", None)) == 3
    assert otlp_receiver.trace_requests == [], "no trace endpoint: spans go to the console"
    assert "postgresql" in agent.output() and "SELECT" in agent.output()


def test_logs_exporter_none_and_console(pg, otlp_receiver):
    with agent_with(otlp_receiver, "--slow-threshold-ms", "50", OTEL_LOGS_EXPORTER="none"):
        query(pg, 1, "SELECT pg_sleep(0.1)")
        otlp_receiver.wait_for_spans(mine(pg), 1)
        time.sleep(1.5)
    assert otlp_receiver.log_requests == []
    with agent_with(otlp_receiver, "--slow-threshold-ms", "50", OTEL_LOGS_EXPORTER="console") as agent:
        query(pg, 1, "SELECT pg_sleep(0.1)")
        otlp_receiver.wait_for_spans(mine(pg), 2)
        time.sleep(1.5)
    assert "WARN slow operation: SELECT" in agent.output()


def test_attribute_value_length_limit(pg, otlp_receiver):
    with agent_with(otlp_receiver, OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="12"):
        query(pg, 1, "SELECT 1 AS a_rather_long_column_name")
        spans = otlp_receiver.wait_for_spans(mine(pg), 1)
    assert spans[0].attributes["db.query.text"] == "SELECT ? AS "
    assert spans[0].attributes["client.port"] > 0, "numbers are not cut"


def test_readyz_waits_for_the_probes_and_healthz_stays_up_when_degraded(pg, otlp_receiver, tmp_path):
    broken = tmp_path / "postgres"
    broken.write_bytes(b"\x7fELF not really an ELF file")
    broken.chmod(0o755)
    agent = AgentProcess("--targets", "postgres", "--binary", f"postgres={broken}", accept_degraded=True,
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        code, ready = agent.health("/readyz")
        hcode, health = agent.health("/healthz")
        query(pg)
        spans = otlp_receiver.wait_for_spans(mine(pg), 3)
    assert code == 200 and ready["status"] == "degraded" and hcode == 200
    (failed,) = [t for t in ready["targets"] if t["state"] == "failed"]
    assert failed["path"] == str(broken) and failed["error"]
    assert any(t["state"] == "ready" for t in ready["targets"])
    assert len(spans) == 3, "the rest of the host is watched all the same"


def test_selectors_by_port_and_exclude(otlp_receiver):
    watched = PostgresServer().start()
    other = PostgresServer().start()
    try:
        with agent_with(otlp_receiver, "--include-ports", str(watched.port)) as agent:
            query(watched, 4)
            query(other, 4)
            otlp_receiver.wait_for_spans(mine(watched), 4)
            time.sleep(1.5)
            status = agent.health()[1]
        assert len([s for s in otlp_receiver.spans() if mine(watched)(s)]) == 4
        assert [s for s in otlp_receiver.spans() if mine(other)(s)] == [], "not selected"
        assert status["starts_unmatched"] == 0
        with agent_with(otlp_receiver, "--exclude-ports", str(watched.port)):
            query(watched, 2, "SELECT 2")
            query(other, 2, "SELECT 2")
            otlp_receiver.wait_for_spans(lambda s: mine(other)(s) and s.attributes.get("db.query.text") == "SELECT ?"
                                         , 2)
            time.sleep(1.5)
        assert len([s for s in otlp_receiver.spans() if mine(watched)(s)]) == 4, "excluded: no new spans"
    finally:
        watched.stop()
        other.stop()


def test_selectors_by_executable_glob(otlp_receiver):
    pg = PostgresServer().start()
    try:
        with agent_with(otlp_receiver, "--include-exe", "/usr/lib/postgresql/*/bin/postgres"):
            query(pg, 3)
            otlp_receiver.wait_for_spans(mine(pg), 3)
            time.sleep(1.0)
        assert len([s for s in otlp_receiver.spans() if mine(pg)(s)]) == 3
        with agent_with(otlp_receiver, "--exclude-exe", "*/bin/postgres") as agent:
            query(pg, 3, "SELECT 2")
            time.sleep(1.5)
            status = agent.health()[1]
        assert len([s for s in otlp_receiver.spans() if mine(pg)(s)]) == 3, "excluded: no new spans"
        assert [u for u in status["targets"] if u["target"] == "postgres"] == [], status
    finally:
        pg.stop()


def move_into_a_container_cgroup(pid: int, container: str) -> str:
    """Put a process in a cgroup named as Docker names its containers' (…/docker/<64 hex>):
    what the agent reads from /proc/PID/cgroup to tell a container. Returns the directory."""
    errors = []
    for hierarchy in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        directory = os.path.join(hierarchy, "docker", container)
        try:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "cgroup.procs"), "w") as fh:
                fh.write(str(pid))
            return directory
        except OSError as exc:
            errors.append(f"{hierarchy}: {exc.strerror}")
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    pytest.fail("cannot create a cgroup to stand for a container: " + "; ".join(errors))


def test_selectors_by_container(otlp_receiver):
    container = secrets.token_hex(32)
    inside, outside = PostgresServer().start(), PostgresServer().start()
    directory = move_into_a_container_cgroup(inside.pid, container)  # its backends are forked into it
    try:
        with agent_with(otlp_receiver, "--include-containers", container[:12]):
            query(inside, 3)
            query(outside, 3)
            otlp_receiver.wait_for_spans(mine(inside), 3)
            time.sleep(1.5)
        spans = [s for s in otlp_receiver.spans() if mine(inside)(s)]
        assert len(spans) == 3 and {s.resource.get("container.id") for s in spans} == {container}
        assert [s for s in otlp_receiver.spans() if mine(outside)(s)] == [], "not in the container"
        with agent_with(otlp_receiver, "--exclude-containers", container):
            query(inside, 2, "SELECT 2")
            query(outside, 2, "SELECT 2")
            otlp_receiver.wait_for_spans(mine(outside), 2)
            time.sleep(1.5)
        assert len([s for s in otlp_receiver.spans() if mine(inside)(s)]) == 3, "excluded: no new spans"
        assert len([s for s in otlp_receiver.spans() if mine(outside)(s)]) == 2
    finally:
        inside.stop()
        outside.stop()
        for path in (directory, os.path.dirname(directory)):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def test_doctor_shows_what_the_selectors_pick():
    import subprocess
    import sys
    pg = PostgresServer().start()
    try:
        r = subprocess.run([sys.executable, "-m", "otel_ebpf.cli", "doctor", "--targets", "postgres",
                            "--include-ports", str(pg.port)], capture_output=True, text=True, timeout=120)
    finally:
        pg.stop()
    assert f"only pids [{pg.pid}]" in r.stdout, r.stdout
    assert "covered: extended protocol (Parse/Bind/Execute)" in r.stdout


def test_prometheus_endpoint_speaks_openmetrics_when_asked(pg, otlp_receiver):
    port = free_port()
    with agent_with(otlp_receiver, "--prometheus-addr", f"127.0.0.1:{port}"):
        query(pg, 2)
        time.sleep(1.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
            plain_type = r.headers["Content-Type"]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=5) as r:
            om = r.read().decode()
            om_type = r.headers["Content-Type"]
    assert "db_server_operation_duration_seconds_bucket" in text and plain_type.startswith("text/plain")
    assert om_type.startswith("application/openmetrics-text") and om.rstrip().endswith("# EOF")
