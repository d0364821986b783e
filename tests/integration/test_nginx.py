"""nginx end to end: Debian's nginx in a temp prefix, real uprobes, the real agent, real OTLP.

Every request the test sends has its own path, so spans and access log lines pair up
one to one. The agent attaches to the nginx binary file, i.e. to every nginx on the
host: spans are told apart by their Resource (this server's master pid).
"""
from __future__ import annotations

import collections
import http.client
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from otel_ebpf.servers.nginx import AccessLogEntry, NginxServer, SlowUpstream, demo_server
from tests.support.agent import AgentProcess
from tests.support.semconv import assert_registered
from tests.support.prereq import require_binary

SLOW_S = 0.2
METRIC_KEYS = {"http.request.method", "url.scheme", "http.response.status_code", "network.protocol.version"}

# Locations beyond NginxServer's own (/static/, = /error, /upstream/): an internal
# redirect (try_files), a rewrite plus a subrequest (auth_request) plus an internal
# redirect, and a `return 500` for a prefix.
EXTRA_CONFIG = """
        location /try/ { try_files $uri /static/ok.txt; }
        location = /auth { internal; return 204; }
        location /protected/ {
            rewrite ^/protected/(.*)$ /renamed/$1 break;
            auth_request /auth;
            try_files $uri /static/ok.txt;
        }
        location /fail/ { return 500; }
"""


@dataclass(frozen=True)
class Sent:
    method: str
    uri: str  # path and query as sent
    status: int
    tls: bool = False
    slow: bool = False

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    openssl = require_binary("openssl")
    d = tmp_path_factory.mktemp("nginx-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture
def upstream():
    server = SlowUpstream(SLOW_S).start()
    yield server
    server.stop()


@pytest.fixture
def nginx(upstream, tls_files):
    require_binary("nginx", "/usr/sbin/nginx")
    cert, key = tls_files
    server = NginxServer(upstream=upstream.address, tls_port=True, ssl_cert=cert, ssl_key=key, http2=True,
                         extra_config=EXTRA_CONFIG).start()
    yield server
    server.stop()


# --- the client side -------------------------------------------------------------------


def self_signed() -> ssl.SSLContext:
    """A client context that accepts the test's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def one_request(server: NginxServer, sent: Sent, conn: http.client.HTTPConnection | None = None) -> None:
    own = conn is None
    if own:
        conn = (http.client.HTTPSConnection("127.0.0.1", server.tls_port, timeout=10, context=self_signed())
                if sent.tls else http.client.HTTPConnection("127.0.0.1", server.port, timeout=10))
    body = b"x=1" if sent.method == "POST" else None
    conn.request(sent.method, sent.uri, body=body, headers={"User-Agent": "otel-ebpf-test/1.0"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == sent.status, (sent, resp.status)
    if own:
        conn.close()


def keep_alive(server: NginxServer, tag: str, count: int) -> list[Sent]:
    """Several requests on one connection."""
    sent = [Sent("GET", f"/try/keepalive-{tag}-{i}", 200) for i in range(count)]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for s in sent:
        one_request(server, s, conn)
    conn.close()
    return sent


def pipelined(server: NginxServer, tag: str, count: int) -> list[Sent]:
    """Requests written back to back before any response is read (raw socket)."""
    sent = [Sent("GET", f"/try/pipelined-{tag}-{i}", 200) for i in range(count - 1)]
    sent.append(Sent("GET", f"/missing/pipelined-{tag}-last", 404))
    payload = b"".join(f"GET {s.uri} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode() for s in sent[:-1])
    payload += f"GET {sent[-1].uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 ") == count - 1 and data.count(b"HTTP/1.1 404 ") == 1, data[:300]
    return sent


def mixed(server: NginxServer, tag: str) -> list[Sent]:
    """One request of each kind, each on its own connection."""
    sent = [
        Sent("GET", "/static/ok.txt" if tag == "a" else "/", 200),
        Sent("GET", f"/try/static-{tag}?token=secret-{tag}&page=2", 200),
        Sent("HEAD", f"/try/head-{tag}", 200),
        Sent("POST", f"/try/post-{tag}", 405),
        Sent("GET", f"/missing/{tag}", 404),
        Sent("GET", f"/fail/{tag}", 500),
        Sent("GET", f"/protected/{tag}?via={tag}", 200),
        Sent("GET", f"/upstream/slow-{tag}", 200, slow=True),
        Sent("GET", f"/try/tls-{tag}", 200, tls=True),
        Sent("GET", f"/fail/tls-{tag}", 500, tls=True),
    ]
    for s in sent:
        one_request(server, s)
    return sent


def bad_request(server: NginxServer) -> None:
    """A request line nginx rejects (400) before it ever reaches ngx_http_process_request."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"NOT-HTTP\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def slow(server: NginxServer, tag: str, count: int) -> list[Sent]:
    """Proxied requests the upstream answers after SLOW_S, one after the other."""
    sent = [Sent("GET", f"/upstream/slow-{tag}-{i}", 200, slow=True) for i in range(count)]
    for s in sent:
        one_request(server, s)
    return sent


def workload(server: NginxServer) -> tuple[list[Sent], set[int]]:
    sent = mixed(server, "a") + keep_alive(server, "a", 5) + pipelined(server, "a", 4) + slow(server, "a", 2)
    new_workers = server.reload()
    sent += mixed(server, "b") + keep_alive(server, "b", 3) + pipelined(server, "b", 3) + slow(server, "b", 2)
    return sent, new_workers


# --- the checks ----------------------------------------------------------------------------


def final_histogram(receiver) -> tuple[int, list[dict]]:
    """Total count and attribute sets of the last (cumulative) export of the duration histogram."""
    latest: dict[tuple, object] = {}
    for _resource, point, attrs in receiver.metric_points("http.server.request.duration"):
        latest[tuple(sorted(attrs.items()))] = point
    return sum(p.count for p in latest.values()), [dict(k) for k in latest]


def check_span(span, sent: Sent, entry: AccessLogEntry, nginx: NginxServer) -> None:
    """One span against what the client sent and what nginx logged for it."""
    a = span.attributes
    assert span.kind == 2 and span.name == sent.method
    assert a["http.request.method"] == sent.method
    assert a["http.response.status_code"] == sent.status == entry.status
    assert span.status_code == (2 if sent.status >= 500 else 0), sent
    assert a.get("error.type") == (str(sent.status) if sent.status >= 500 else None)
    assert a["url.scheme"] == ("https" if sent.tls else "http")
    assert a["server.port"] == (nginx.tls_port if sent.tls else nginx.port)
    assert a["network.protocol.version"] == "1.1"
    assert a["client.address"] == "127.0.0.1" and a["client.port"] == entry.remote_port
    # nginx writes its process title over its environment: no OTEL_SERVICE_NAME to read
    assert span.resource["service.name"] == "nginx"
    assert span.resource["process.executable.name"] == "nginx"
    if sent.slow:
        assert SLOW_S <= span.duration_s < SLOW_S + 0.5
    else:
        assert 0 <= span.duration_s < SLOW_S


def check_request_time(diffs: list[float]) -> None:
    """Span durations minus $request_time for the slow requests. nginx's clock has ms
    resolution and is read once per event loop turn, so it may lag the request's end; a
    worker preempted on a loaded machine may lag a few ms more, once."""
    close = [d for d in diffs if abs(d) <= 0.002]
    assert len(close) >= len(diffs) - 1 and all(abs(d) <= 0.010 for d in diffs), diffs


def test_one_span_per_request(nginx, otlp_receiver):
    agent = AgentProcess("--targets", "nginx", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    agent.start()
    mine = lambda s: s.resource.get("process.pid") == nginx.master_pid  # noqa: E731
    try:
        assert agent.health()[1]["probes_attached"] == 2
        sent, new_workers = workload(nginx)
        bad_request(nginx)
        otlp_receiver.wait_for_spans(mine, len(sent) + 1)
        time.sleep(1.0)  # anything extra would arrive now
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output()
    spans = [s for s in otlp_receiver.spans() if mine(s)]

    # The request nginx rejected before parsing it: dated by nginx's clock, still a span.
    rejected = [s for s in spans if "url.path" not in s.attributes]
    assert [(s.name, s.attributes["http.request.method"], s.attributes["http.response.status_code"],
             s.status_code) for s in rejected] == [("HTTP", "_OTHER", 400, 0)]

    served = [s for s in spans if "url.path" in s.attributes]
    by_path = {s.attributes["url.path"]: s for s in served}
    assert len(served) == len(sent) == len(by_path), sorted(by_path)
    assert set(by_path) == {s.path for s in sent}

    log = {e.request_uri: e for e in nginx.access_log_entries()}
    assert {e.pid for e in log.values()} & new_workers, "the reload's new workers served requests"
    for s in sent:
        check_span(by_path[s.path], s, log[s.uri], nginx)
    check_request_time([by_path[s.path].duration_s - log[s.uri].request_time for s in sent if s.slow])

    assert by_path["/try/static-a"].attributes["url.query"] == "token=REDACTED&page=REDACTED"
    assert by_path["/protected/a"].attributes["url.query"] == "via=REDACTED"
    assert by_path["/try/head-a"].attributes["user_agent.original"] == "otel-ebpf-test/1.0"
    assert "url.query" not in by_path["/missing/a"].attributes
    assert len({by_path[f"/try/keepalive-a-{i}"].attributes["client.port"] for i in range(5)}) == 1
    assert "secret" not in otlp_receiver.all_exported_text()
    assert_registered(spans)

    # The kernel histogram counts every finished request once, whichever nginx on the host
    # served it: exactly ours when no other nginx served anything meanwhile.
    total, attribute_sets = final_histogram(otlp_receiver)
    foreign = [s for s in otlp_receiver.spans()
               if s.resource.get("process.executable.name") == "nginx" and not mine(s)]
    assert total == len(sent) + 1 if not foreign else total >= len(sent) + 1
    assert all(set(attrs) <= METRIC_KEYS for attrs in attribute_sets)
    assert {"http.request.method": "GET", "url.scheme": "https", "http.response.status_code": 500,
            "network.protocol.version": "1.1"} in attribute_sets


def test_detach_leaves_nginx_serving(nginx, otlp_receiver):
    """Stopping the agent removes the probes: nginx keeps serving and no span follows."""
    agent = AgentProcess("--targets", "nginx", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        one_request(nginx, Sent("GET", "/try/attached", 200))
        mine = lambda s: s.resource.get("process.pid") == nginx.master_pid  # noqa: E731
        assert len(otlp_receiver.wait_for_spans(mine, 1)) == 1
    one_request(nginx, Sent("GET", "/try/detached", 200))
    time.sleep(0.5)
    assert [s.attributes["url.path"] for s in otlp_receiver.spans() if mine(s)] == ["/try/attached"]


def test_restarted_nginx_keeps_its_spans_without_restarting_the_agent(nginx, otlp_receiver):
    """nginx stopped and started again (new master, new workers: `systemctl restart nginx`):
    requests keep their spans, plain and TLS alike."""
    agent = AgentProcess("--targets", "nginx", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        first_master = nginx.master_pid
        for i in range(6):
            one_request(nginx, Sent("GET", f"/try/before-restart-{i}", 200, tls=i % 2 == 1))
        before = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == first_master, 6)
        new_workers = nginx.restart()
        assert nginx.master_pid != first_master and new_workers
        for i in range(8):
            one_request(nginx, Sent("GET", f"/try/after-restart-{i}", 200, tls=i % 2 == 1))
        after = otlp_receiver.wait_for_spans(lambda s: s.resource.get("process.pid") == nginx.master_pid, 8)
        time.sleep(1.0)  # anything extra would arrive now
        total, _ = final_histogram(otlp_receiver)
        status = agent.health()[1]
    assert agent.returncode == 0, agent.output()
    assert sorted(s.attributes["url.path"] for s in before) == [f"/try/before-restart-{i}" for i in range(6)]
    assert sorted(s.attributes["url.path"] for s in after) == [f"/try/after-restart-{i}" for i in range(8)]
    assert [s.attributes["url.scheme"] for s in sorted(after, key=lambda s: s.attributes["url.path"])] \
        == ["http", "https"] * 4
    assert total == 6 + 8, "the kernel histogram counts the requests of both nginx masters"
    assert status["attach_failures"] == 0 and status["events_lost"] == 0


def test_http2_streams(nginx, otlp_receiver):
    """HTTP/2 streams run on a fake connection copied from the real one: same client, TLS."""
    curl = require_binary("curl")
    agent = AgentProcess("--targets", "nginx", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        run = subprocess.run([curl, "-sk", "--http2", "-o", "/dev/null", "-o", "/dev/null",
                              "-w", "%{http_version} %{http_code}\\n",
                              nginx.url("/try/h2-one?k=v", tls=True), nginx.url("/fail/h2-two", tls=True)],
                             capture_output=True, text=True, timeout=30)
        assert run.stdout.split("\n")[:2] == ["2 200", "2 500"], run.stdout + run.stderr
        mine = lambda s: s.resource.get("process.pid") == nginx.master_pid  # noqa: E731
        otlp_receiver.wait_for_spans(mine, 2)
        time.sleep(0.5)
    spans = {s.attributes["url.path"]: s for s in otlp_receiver.spans() if mine(s)}
    assert set(spans) == {"/try/h2-one", "/fail/h2-two"}
    one, two = spans["/try/h2-one"].attributes, spans["/fail/h2-two"].attributes
    for a in (one, two):
        assert a["network.protocol.version"] == "2" and a["url.scheme"] == "https"
        assert a["server.port"] == nginx.tls_port and a["user_agent.original"].startswith("curl/")
    assert one["client.port"] == two["client.port"]  # two streams, one connection
    assert one["url.query"] == "k=REDACTED" and two["http.response.status_code"] == 500
    assert spans["/fail/h2-two"].status_code == 2


def test_demo_server_workload():
    demo = demo_server()
    counts: collections.Counter = collections.Counter()
    stop = threading.Event()
    try:
        worker = threading.Thread(target=demo.workload, args=(stop, counts))
        worker.start()
        time.sleep(3.0)
        stop.set()
        worker.join(10)
    finally:
        demo.stop()
    assert demo.name == "nginx" and not worker.is_alive()
    assert counts["nginx 200"] and counts["nginx 404"] and counts["nginx 500"], counts
    assert not counts["nginx connection error"], counts
