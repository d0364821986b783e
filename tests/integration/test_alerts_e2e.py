"""The slow-query alerts, end to end without containers: real PostgreSQL, the agent's
Prometheus endpoint, Prometheus from Debian evaluating the project's own rules."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psycopg2
import pytest

from otel_ebpf.servers import free_port, wait_for_port
from otel_ebpf.servers.postgres import PostgresServer
from tests.support.agent import AgentProcess
from tests.support.prereq import require_binary
from tests.unit.test_stack import dashboard_metric_names

RULES = Path(__file__).resolve().parents[2] / "collector-config/rules/otel-ebpf-alerts.yml"
ALERTS = ("SlowQueriesP95", "SlowQuerySummary")


@pytest.fixture
def prometheus(tmp_path):
    binary = require_binary("prometheus", "/usr/bin/prometheus")
    port, agent_port = free_port(), free_port()
    # Same rules, shorter `for:` windows so that the test takes seconds, not minutes.
    rules = re.sub(r"for: \d+m", "for: 3s", RULES.read_text())
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [rules.yml]
scrape_configs:
  - job_name: otel-ebpf-agent
    static_configs: [{{targets: ["127.0.0.1:{agent_port}"]}}]
""")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield port, agent_port
    proc.terminate()
    proc.wait(10)


def firing(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as r:
        alerts = json.loads(r.read())["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def load(pg: PostgresServer, stop: threading.Event, query: str) -> None:
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        while not stop.is_set():
            cur.execute(query)
            stop.wait(0.05)
    conn.close()


def test_slow_query_alert_fires_on_slow_queries_only(prometheus):
    prom_port, agent_port = prometheus
    with PostgresServer() as pg, AgentProcess("--targets", "postgres", "--output", "jsonl:/dev/null",
                                              "--prometheus-addr", f"127.0.0.1:{agent_port}"):
        stop = threading.Event()
        fast = threading.Thread(target=load, args=(pg, stop, "SELECT count(*) FROM pg_class"))
        fast.start()
        time.sleep(12)  # fast queries only: several evaluations past the `for:` window
        quiet = firing(prom_port) & set(ALERTS)
        slow = threading.Thread(target=load, args=(pg, stop, "SELECT pg_sleep(0.6)"))
        slow2 = threading.Thread(target=load, args=(pg, stop, "SELECT pg_sleep(0.7)"))
        slow.start()
        slow2.start()
        deadline = time.monotonic() + 60
        fired: set[str] = set()
        while time.monotonic() < deadline and not set(ALERTS) <= fired:
            fired = firing(prom_port)
            time.sleep(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/metrics", timeout=5) as r:
            exposition = r.read().decode()
        stop.set()
        for t in (fast, slow, slow2):
            t.join()
    exported = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
                if line and not line.startswith("#")}
    needed = {n for n in dashboard_metric_names(agent_only=True) if not n.startswith("http_")}
    assert needed <= exported, f"the dashboard reads metrics the agent does not export: {needed - exported}"
    assert quiet == set(), f"fast queries alone fired {quiet}"
    assert set(ALERTS) <= fired, f"slow queries fired only {fired}"
