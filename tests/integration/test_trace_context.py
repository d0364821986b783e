"""Trace context: the agent's spans join the application's traces.

A small Python application, instrumented with the OpenTelemetry SDK and the real
instrumentations (psycopg 3 and psycopg2 with sqlcommenter, requests), runs in its own
process and exports its spans to the same OTLP receiver as the agent. Every agent span of
its queries and requests must carry the application's trace id, with the instrumented
client span as its parent: simple and extended protocol, a query longer than
query_max_bytes, nginx over HTTP and HTTPS, and the TLS client side seen through
OpenSSL. MariaDB gets a sqlcommenter-style comment by hand. Hostile comments and headers
are ignored, never trusted half-way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from otel_ebpf import waterfall
from otel_ebpf.servers.https import self_signed_cert
from otel_ebpf.servers.mariadb import MariadbServer
from otel_ebpf.servers.nginx import NginxServer
from otel_ebpf.servers.postgres import PostgresServer
from tests.support.agent import AgentProcess
from tests.support.prereq import require_binary

APP = textwrap.dedent(r'''
    import json, sys, urllib3
    from opentelemetry import trace, propagate
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.psycopg2 import Psycopg2Instrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    cfg = json.loads(sys.argv[1])
    provider = TracerProvider(resource=Resource.create({"service.name": "shop-app"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=cfg["otlp"], insecure=True)))
    trace.set_tracer_provider(provider)
    PsycopgInstrumentor().instrument(enable_commenter=True, commenter_options={})
    Psycopg2Instrumentor().instrument(enable_commenter=True, commenter_options={})
    RequestsInstrumentor().instrument()
    import psycopg, psycopg2, pymysql, requests
    urllib3.disable_warnings()
    tracer = trace.get_tracer("shop-app")
    long_names = ", ".join(f"'{'name-%04d' % i}'" for i in range(400))  # about 5 KB of query
    with tracer.start_as_current_span("checkout"):
        with psycopg.connect(cfg["pg"], autocommit=True) as conn:
            for i in range(3):
                conn.execute("SELECT name FROM items WHERE id = %s", (i + 1,))  # extended protocol
            conn.execute(f"SELECT count(*) FROM items WHERE name IN ({long_names}) AND id > %s", (0,))
        conn2 = psycopg2.connect(cfg["pg"])  # the simple protocol: psycopg2 binds on the client
        conn2.autocommit = True
        with conn2.cursor() as cur:
            for i in range(2):
                cur.execute("SELECT price FROM items WHERE id = %s", (i + 1,))
        conn2.close()
        for url in cfg["urls"]:
            requests.get(url, verify=False, timeout=10)
        carrier = {}
        with tracer.start_as_current_span("mariadb-call", kind=trace.SpanKind.CLIENT):
            propagate.inject(carrier)
            my = pymysql.connect(**cfg["mysql"], autocommit=True)
            with my.cursor() as cur:
                cur.execute("SELECT name FROM stock WHERE sku = 'a-1' /*traceparent='%s'*/" % carrier["traceparent"])
            my.close()
    provider.shutdown()
''')


@pytest.fixture(scope="module")
def servers():
    require_binary("nginx", "/usr/sbin/nginx")
    require_binary("mariadbd", "/usr/sbin/mariadbd")
    pg = PostgresServer().start()
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text, price int)")
    pg.psql("INSERT INTO items SELECT g, 'name-' || lpad(g::text, 4, '0'), g FROM generate_series(1, 500) g")
    my = MariadbServer().start()
    my.sql("CREATE DATABASE shop; CREATE TABLE shop.stock (sku VARCHAR(32) PRIMARY KEY, name VARCHAR(64))")
    certs = tempfile.mkdtemp(prefix="otel-ebpf-tc-")
    cert, key = self_signed_cert(certs)
    ngx = NginxServer(workers=1, tls_port=True, ssl_cert=cert, ssl_key=key).start()
    yield pg, my, ngx
    ngx.stop()
    my.stop()
    pg.stop()


@pytest.fixture
def agent(otlp_receiver):
    a = AgentProcess("--targets", "postgres,mysql,nginx,openssl",
                     env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    a.start()
    yield a
    assert a.stop() == 0, a.output()


def run_app(otlp_receiver, pg, my, ngx) -> None:
    cfg = {"otlp": otlp_receiver.grpc_endpoint, "pg": f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres",
           "urls": [ngx.url("/static/ok.txt"), ngx.url("/static/ok.txt", tls=True)],
           "mysql": {**my.connect_args("shop")}}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    r = subprocess.run([sys.executable, "-c", APP, json.dumps(cfg)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_agent_spans_are_children_of_the_application_spans(servers, agent, otlp_receiver):
    pg, my, ngx = servers
    run_app(otlp_receiver, pg, my, ngx)
    app = lambda s: s.resource.get("service.name") == "shop-app"  # noqa: E731
    app_spans = otlp_receiver.wait_for_spans(app, 10)
    (root,) = [s for s in app_spans if s.name == "checkout"]
    trace_id = root.trace_id
    by_id = {s.span_id: s for s in app_spans}
    pg_spans = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == pg.pid, 6)
    nginx_spans = otlp_receiver.wait_for_spans(lambda s: s.attributes.get("url.path") == "/static/ok.txt"
                                               and s.kind == 2, 2)
    my_spans = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == my.pid
                                            and "stock" in s.attributes.get("db.query.text", ""), 1)
    tls_clients = otlp_receiver.wait_for_spans(lambda s: s.kind == 3 and s.attributes.get("url.scheme") == "https"
                                               and s.resource.get("process.executable.name", "").startswith("python"),
                                               1)
    time.sleep(1.0)

    def parent_of(span):
        assert span.trace_id == trace_id, f"{span.name}: not in the application's trace"
        parent = by_id.get(span.parent_span_id)
        assert parent is not None, f"{span.name}: its parent {span.parent_span_id.hex()} is no application span"
        return parent

    assert len(pg_spans) == 6, [s.attributes.get("db.query.text") for s in pg_spans]
    for s in pg_spans:
        parent = parent_of(s)
        assert parent.kind == 3 and parent.attributes.get("db.system.name", parent.attributes.get("db.system")) \
            == "postgresql", parent.name
        assert "traceparent" not in s.attributes.get("db.query.text", ""), "the comment never reaches the text"
    long_query = [s for s in pg_spans if "IN (" in s.attributes.get("db.query.text", "")]
    assert len(long_query) == 1, "the query longer than query_max_bytes joined through its tail"
    assert len(nginx_spans) == 2
    for s in nginx_spans:
        parent = parent_of(s)
        assert parent.kind == 3 and parent.name.startswith("GET")
    (tls_client,) = tls_clients
    assert parent_of(tls_client).name.startswith("GET")
    (mariadb_span,) = my_spans
    assert parent_of(mariadb_span).name == "mariadb-call"

    # The whole trace as text (docs/trace-context.md shows one): the agent's spans indented
    # under the application's client spans.
    in_trace = [s for s in otlp_receiver.spans() if s.trace_id == trace_id]
    picture = waterfall.render(waterfall.Bar(
        s.name if s.resource.get("service.name") == "shop-app" else s.name[:40],
        str(s.resource.get("service.name")), s.kind, s.start_ns, s.end_ns, s.span_id, s.parent_span_id)
        for s in in_trace)
    lines = picture.splitlines()
    assert lines[0].startswith("shop-app: checkout (internal)")
    assert any(line.startswith("    nginx: GET (server)") for line in lines), picture
    assert any(line.startswith("    postgres: SELECT items (server)") for line in lines), picture
    if os.environ.get("OTEL_EBPF_WATERFALL_OUT"):
        with open(os.environ["OTEL_EBPF_WATERFALL_OUT"], "w") as fh:
            fh.write(picture + "\n")


HOSTILE_COMMENTS = [
    "/*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7'*/",  # too short
    "/*traceparent='00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01'*/",  # upper case: not W3C
    "/*traceparent='00-00000000000000000000000000000000-00f067aa0ba902b7-01'*/",  # all-zero trace id
    "/*traceparent='zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/",
    "/*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',"
    "traceparent='00-11111111111111111111111111111111-2222222222222222-01'*/",  # two in one
    "/*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/ "
    "/*traceparent='00-11111111111111111111111111111111-2222222222222222-01'*/",  # two comments
    "/*traceparent='" + "a" * 5000 + "'*/",  # huge
    "/*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra'*/",  # 00 has no more
    "/*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'",  # unterminated
]


def test_hostile_comments_and_headers_are_ignored(servers, agent, otlp_receiver):
    import psycopg2
    import requests
    pg, _my, ngx = servers
    conn = psycopg2.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for comment in HOSTILE_COMMENTS:
            try:
                cur.execute(f"SELECT 'leak-me-not' {comment}")
            except psycopg2.errors.SyntaxError:
                pass  # the unterminated one: a failed query, with its span all the same
        # inside a string literal: a literal, not a comment (and never exported)
        cur.execute("SELECT '/*traceparent=''00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01''*/'")
    conn.close()
    bad_headers = [{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"},
                   {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
                   {"traceparent": "\u00e9" * 55}, {"traceparent": "x" * 4000}]
    for headers in bad_headers:
        requests.get(ngx.url("/static/ok.txt"), headers=headers, timeout=10)
    # two traceparent headers: invalid as a whole
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", ngx.port, timeout=10)
    c.putrequest("GET", "/static/ok.txt?two")
    c.putheader("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    c.putheader("traceparent", "00-11111111111111111111111111111111-2222222222222222-01")
    c.endheaders()
    c.getresponse().read()
    c.close()
    pg_spans = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == pg.pid,
                                            len(HOSTILE_COMMENTS) + 1)
    nginx_spans = otlp_receiver.wait_for_spans(lambda s: s.attributes.get("url.path") == "/static/ok.txt",
                                               len(bad_headers) + 1)
    time.sleep(1.0)
    assert len(pg_spans) == len(HOSTILE_COMMENTS) + 1 and len(nginx_spans) == len(bad_headers) + 1
    for s in pg_spans + nginx_spans:
        assert s.parent_span_id == b"", f"{s.name}: a parent from a hostile value"
        assert s.trace_id not in (bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("1" * 32))
    assert "leak-me-not" not in otlp_receiver.all_exported_text()
    assert agent.proc.poll() is None


def test_sampled_parents_are_kept_before_unsampled_spans_when_the_budget_is_tight(otlp_receiver):
    """A tight budget (50 spans/s) and a flood of queries: those whose comment carries a
    sampled parent are still kept (the kernel finds them over the budget, within a budget
    of their own), the others are sampled down; a parent that says unsampled is left out
    (parentbased_always_on)."""
    import psycopg2
    pg = PostgresServer().start()
    agent = AgentProcess("--targets", "postgres", "--max-spans-per-second", "50",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    sampled = "00-{:032x}-{:016x}-01"
    unsampled = "00-{:032x}-{:016x}-00"
    try:
        with agent:
            conn = psycopg2.connect(pg.dsn())
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"SELECT 0 /*traceparent='{sampled.format(1, 1)}'*/")  # the agent learns of parents
                time.sleep(0.5)
                for i in range(1, 3001):
                    if i % 60 == 0:
                        cur.execute(f"SELECT {i} /*db_driver='test',traceparent='{sampled.format(i, i)}'*/")
                    elif i % 60 == 30:
                        cur.execute(f"SELECT {i} /*traceparent='{unsampled.format(i, i)}'*/")
                    else:
                        cur.execute(f"SELECT {i}")
            conn.close()
            time.sleep(2.0)
            status = agent.health()[1]
    finally:
        pg.stop()
    spans = [s for s in otlp_receiver.spans() if s.resource.get("process.pid") == pg.pid]
    parented = [s for s in spans if s.parent_span_id]
    plain = [s for s in spans if not s.parent_span_id]
    # Sampled parents have a budget of their own beside the main one (the same rate): over
    # the budget, most of them are kept while the plain queries are cut to the budget.
    assert len(parented) >= 46, f"{len(parented)} of 51 sampled-parent queries kept"
    assert all(s.flags & 1 for s in parented), "only sampled parents are exported"
    assert len(plain) < 500, f"{len(plain)} of 2900 plain queries: the budget should cut them"
    assert len(parented) / 51 > 4 * len(plain) / 2900
    assert otlp_receiver.db_duration_counts("postgresql").get(("SELECT", None), 0) == 3001
    assert status["events_lost"] == 0
    assert 0 < status["spans_kept_by_parent"] <= 51, status
    unsampled_kept = len([i for i in range(30, 3001, 60)]) - status["spans_parent_unsampled"]
    assert status["spans_parent_unsampled"] > 0 and unsampled_kept >= 0, status
    assert status["spans_sampled_out"] >= 2900 - len(plain), "every span not exported is counted"
