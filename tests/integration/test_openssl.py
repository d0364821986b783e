"""OpenSSL end to end: nginx over TLS, curl and Python clients, the agent reading HTTP/1.x
plaintext at libssl's SSL_read/SSL_write, real OTLP.

The agent runs with `--targets openssl` only, so nginx's own target is off and nginx
is seen through libssl like any other server: its requests become SERVER spans (on
the worker that served them), the clients' become CLIENT spans.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from otel_ebpf.servers import free_port
from otel_ebpf.servers.nginx import NginxServer
from tests.support.agent import AgentProcess
from tests.support.semconv import assert_registered
from tests.support.prereq import require, require_binary


SECRET_AUTH = "s3cr3t-authz-5e1b"
SECRET_COOKIE = "s3cr3t-cookie-77aa"
SECRET_BODY = "s3cr3t-body-c0ffee"
SECRET_QUERY = "s3cr3t-query-9d"
BIG = 1024 * 1024

# (method, path, status) each client sends, in order. Paths are distinct per client.
CURL_REQUESTS = [
    ("GET", "/ok/curl-1", 200),
    ("GET", "/missing/curl-2", 404),
    ("GET", "/fail/curl-3", 500),
    ("GET", "/static/big.bin", 200),
    ("POST", "/ok/curl-5", 200),
]
PYTHON_REQUESTS = [  # over one http.client connection (keep-alive)
    ("GET", "/ok/py-1", 200),
    ("GET", "/missing/py-2", 404),
    ("GET", "/fail/py-3", 500),
    ("GET", "/static/big.bin", 200),
    ("HEAD", "/static/big.bin", 200),
    ("POST", f"/ok/py-6?token={SECRET_QUERY}&page=2", 200),
]
PIPELINED_REQUESTS = [  # two requests in one write on a raw TLS socket
    ("GET", "/ok/pipe-1", 200),
    ("GET", "/missing/pipe-2", 404),
]

PYTHON_CLIENT = r"""
import http.client, json, re, socket, ssl, sys
port, requests, pipelined, auth, body = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
context = ssl._create_unverified_context()
conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
out = []
for method, path, _ in requests:
    conn.request(method, path, body=body.encode() if method == "POST" else None,
                 headers={"Authorization": "Bearer " + auth, "User-Agent": "otel-ebpf-test/python"})
    resp = conn.getresponse()
    out.append([method, path, resp.status, len(resp.read())])
conn.close()
raw = "".join(f"{m} {p} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {auth}\r\n"
              + ("Connection: close\r\n" if i == len(pipelined) - 1 else "") + "\r\n"
              for i, (m, p, _) in enumerate(pipelined)).encode()
sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost")
sock.sendall(raw)
received = b""
while chunk := sock.recv(65536):
    received += chunk
sock.close()
for (m, p, _), status in zip(pipelined, re.findall(rb"HTTP/1\.1 (\d{3})", received)):
    out.append([m, p, int(status), 0])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    openssl = require_binary("openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", key, "-out", cert], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return cert, key


@pytest.fixture(scope="module")
def nginx(certificate):
    require_binary("nginx", "/usr/sbin/nginx")
    cert, key = certificate
    h2_port = free_port()
    extra = f"""
        listen 127.0.0.1:{h2_port} ssl http2;
        location /ok/ {{ return 200 "ok\\n"; }}
        location /missing/ {{ return 404; }}
        location /fail/ {{ return 500; }}
    """
    server = NginxServer(workers=2, tls_port=True, ssl_cert=cert, ssl_key=key, extra_config=extra).start()
    server.h2_port = h2_port  # type: ignore[attr-defined]
    with open(os.path.join(server.prefix, "html", "static", "big.bin"), "wb") as fh:
        fh.write(b"0123456789abcdef" * (BIG // 16))
    yield server
    server.stop()


def run_curl(port: int) -> tuple[int, list[str]]:
    """One curl process, one connection reused for every request (--next keeps it)."""
    curl = require_binary("curl")
    common = ["-k", "-sS", "--http1.1", "-H", f"Authorization: Bearer {SECRET_AUTH}", "-b", f"sid={SECRET_COOKIE}",
              "-w", "%{http_code} %{num_connects} %{size_download}\\n", "-o", "/dev/null"]
    argv = [curl]
    for i, (method, path, _) in enumerate(CURL_REQUESTS):
        if i:
            argv.append("--next")
        argv += common
        if method == "POST":
            argv += ["--data-binary", SECRET_BODY]
        argv.append(f"https://127.0.0.1:{port}{path}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc.pid, out.split("\n")[:-1]


def run_python(port: int) -> tuple[int, list]:
    proc = subprocess.Popen([sys.executable, "-c", PYTHON_CLIENT, str(port), json.dumps(PYTHON_REQUESTS),
                             json.dumps(PIPELINED_REQUESTS), SECRET_AUTH, SECRET_BODY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc.pid, json.loads(out)


def run_curl_http2(port: int) -> int:
    proc = subprocess.Popen([require_binary("curl"), "-k", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}",
                             f"https://127.0.0.1:{port}/ok/h2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "2", (out, err)
    return proc.pid


def connections(server: NginxServer) -> list[list[str]]:
    """Request URIs nginx served, grouped by connection, in the order connections opened."""
    groups: dict[int, list[str]] = {}
    for entry in server.access_log_entries():
        groups.setdefault(entry.connection, []).append(entry.request_uri)
    return list(groups.values())


def triples(spans) -> list[tuple[str, str, int]]:
    return sorted((s.attributes["http.request.method"],
                   s.attributes["url.path"] + (f"?{s.attributes['url.query']}" if "url.query" in s.attributes else ""),
                   s.attributes["http.response.status_code"]) for s in spans)


def expected_triples(requests) -> list[tuple[str, str, int]]:
    redacted = [(m, p.replace(f"token={SECRET_QUERY}&page=2", "token=REDACTED&page=REDACTED"), s)
                for m, p, s in requests]
    return sorted(redacted)


def test_https_client_and_server_spans(nginx, otlp_receiver):
    require(os.path.exists("/usr/lib/x86_64-linux-gnu/libssl.so.3") or os.path.exists("/lib/x86_64-linux-gnu/libssl.so.3"),
            "OpenSSL 3's libssl.so.3 is not installed")
    workers = nginx.worker_pids()
    agent = AgentProcess("--targets", "openssl", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    agent.start()
    try:
        status = agent.health()[1]
        libs = [t for t in status["targets"] if t["target"] == "openssl" and t["probes"]]
        assert libs, status
        assert {"SSL_read()", "SSL_read() return", "SSL_write_ex()", "SSL_free()"} <= set(libs[0]["probes"])
        # One attach per file: the /lib and /usr/lib paths of libssl.so.3 are the same file.
        assert len({os.stat(t["path"]).st_ino for t in libs}) == len(libs)

        curl_pid, curl_results = run_curl(nginx.tls_port)
        python_pid, python_results = run_python(nginx.tls_port)
        h2_pid = run_curl_http2(nginx.h2_port)

        clients = {curl_pid, python_pid}
        expected = len(CURL_REQUESTS) + len(PYTHON_REQUESTS) + len(PIPELINED_REQUESTS)
        watched = lambda s: s.resource.get("process.pid") in clients | workers  # noqa: E731
        otlp_receiver.wait_for_spans(watched, 2 * expected, timeout=30)
        time.sleep(1.5)  # anything extra would arrive now
        spans = otlp_receiver.spans()
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output()

    # The clients did what we think they did: statuses, sizes, and connections kept alive
    # (nginx closes a connection after a 500, so each client opens a second one after it).
    assert [line.split()[0] for line in curl_results] == [str(s) for _, _, s in CURL_REQUESTS]
    assert int(curl_results[3].split()[2]) == BIG
    assert [r[2] for r in python_results] == [s for _, _, s in PYTHON_REQUESTS + PIPELINED_REQUESTS]
    assert python_results[3][3] == BIG
    assert connections(nginx) == [
        [p for _, p, _ in CURL_REQUESTS[:3]], [p for _, p, _ in CURL_REQUESTS[3:]],
        [p for _, p, _ in PYTHON_REQUESTS[:3]], [p for _, p, _ in PYTHON_REQUESTS[3:]],
        [p for _, p, _ in PIPELINED_REQUESTS], ["/ok/h2"]]

    curl_spans = [s for s in spans if s.resource.get("process.pid") == curl_pid]
    python_spans = [s for s in spans if s.resource.get("process.pid") == python_pid]
    server_spans = [s for s in spans if s.resource.get("process.pid") in workers]
    assert not [s for s in spans if s.resource.get("process.pid") == h2_pid], "HTTP/2 is not HTTP/1.x"

    # Exactly one CLIENT span per request, from the client process.
    assert all(s.kind == 3 for s in curl_spans + python_spans)
    assert triples(curl_spans) == expected_triples(CURL_REQUESTS)
    assert triples(python_spans) == expected_triples(PYTHON_REQUESTS + PIPELINED_REQUESTS)
    # Exactly one SERVER span per request, from the nginx worker that served it.
    assert all(s.kind == 2 for s in server_spans)
    assert triples(server_spans) == expected_triples(CURL_REQUESTS + PYTHON_REQUESTS + PIPELINED_REQUESTS)
    assert all(s.resource["process.executable.name"] == "nginx" for s in server_spans)

    for s in curl_spans + python_spans:
        a = s.attributes
        host = "localhost" if "/pipe-" in a["url.path"] else "127.0.0.1"
        assert a["server.address"] == host
        assert a["server.port"] == (443 if host == "localhost" else nginx.tls_port)
        port = "" if host == "localhost" else f":{nginx.tls_port}"
        query = f"?{a['url.query']}" if "url.query" in a else ""
        assert a["url.full"] == f"https://{host}{port}{a['url.path']}{query}"
        assert (s.status_code == 2) == (a["http.response.status_code"] >= 400)
    for s in server_spans:
        a = s.attributes
        assert a["url.scheme"] == "https" and a["network.protocol.version"] == "1.1"
        assert (s.status_code == 2) == (a["http.response.status_code"] >= 500)
        if "/pipe-" in a["url.path"]:
            assert "user_agent.original" not in a  # the raw pipelined requests send none
        else:
            assert a["user_agent.original"].startswith(("curl/", "otel-ebpf-test/python"))

    # First request byte to last response byte: the server reads the request after the
    # client began writing it, and finishes about when the client has read the response.
    # Over loopback the client can return from its last SSL_read before nginx returns
    # from the SSL_write that sent it (2 CPUs: the woken client may preempt nginx), so
    # the end is only checked within a slack.
    server_by_path = {s.attributes["url.path"]: s for s in server_spans}
    for c in curl_spans + python_spans:
        path = c.attributes["url.path"]
        if path == "/static/big.bin":
            continue  # requested three times
        srv = server_by_path[path]
        assert c.start_ns <= srv.start_ns <= srv.end_ns, path
        assert srv.end_ns <= c.end_ns + 20_000_000, path
    big = [s for s in curl_spans + python_spans if s.attributes["url.path"] == "/static/big.bin"
           and s.attributes["http.request.method"] == "GET"]
    assert len(big) == 2 and all(s.status_code == 0 for s in big)

    exported = otlp_receiver.all_exported_text()
    for secret in (SECRET_AUTH, SECRET_COOKIE, SECRET_BODY, SECRET_QUERY):
        assert secret not in exported, f"{secret} left the agent"

    assert_registered(curl_spans + python_spans + server_spans)


def test_nginx_target_wins_over_libssl(nginx, otlp_receiver):
    """With the nginx target on, nginx's HTTPS requests are reported once (by the nginx
    target); the clients' CLIENT spans still come from libssl."""
    from otel_ebpf.targets import registry
    require("nginx" in registry.available(), "the nginx target is not in this build")
    server_pids = nginx.worker_pids() | {nginx.master_pid}
    agent = AgentProcess("--targets", "nginx,openssl", env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.grpc_endpoint})
    with agent:
        curl_pid, _ = run_curl(nginx.tls_port)
        mine = lambda s: s.resource.get("process.pid") in server_pids | {curl_pid}  # noqa: E731
        otlp_receiver.wait_for_spans(mine, 2 * len(CURL_REQUESTS), timeout=30)
        time.sleep(1.5)
        spans = [s for s in otlp_receiver.spans() if mine(s)]
    client = [s for s in spans if s.resource["process.pid"] == curl_pid]
    server = [s for s in spans if s.resource["process.pid"] in server_pids]
    assert all(s.kind == 3 for s in client) and triples(client) == expected_triples(CURL_REQUESTS)
    assert all(s.kind == 2 for s in server)
    assert sorted(s.attributes["url.path"] for s in server) == sorted(p for _, p, _ in CURL_REQUESTS), \
        "each nginx request once: libssl records of nginx processes are left to the nginx target"
