"""A throwaway nginx: its own prefix and nginx.conf in a temp dir, free 127.0.0.1 ports.

Started as root the way a packaged nginx runs (a root master, workers as `nobody`),
with `-p prefix -c conf -g 'pid ...;'` so that nothing of the system's nginx (its
config, pid file, logs, service) is touched. The access log records `$request_time`
in a tab-separated format that `access_log_entries()` parses.

`SlowUpstream` is a small http.server thread answering after a delay, for
`proxy_pass` locations; `demo_server()` wires both together for `otel-ebpf demo`.
"""
from __future__ import annotations

import collections
import http.client
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import ServerError, free_port, wait_for_port, which

WORKER_USER = "nobody"
# Tab-separated so that paths with spaces (escaped by nginx anyway) cannot shift fields.
LOG_FIELDS = ("pid", "method", "request_uri", "status", "request_time", "protocol", "remote_port",
              "connection", "connection_requests")
# nginx turns the two characters \t inside a quoted config string into a tab.
LOG_FORMAT = "\\t".join(("$pid", "$request_method", "$request_uri", "$status", "$request_time",
                          "$server_protocol", "$remote_port", "$connection", "$connection_requests"))


def nginx_binary() -> str:
    path = which("nginx", "/usr/sbin", "/usr/local/nginx/sbin")
    if path is None:
        raise ServerError("nginx is not installed: apt-get install nginx")
    return path


@dataclass(frozen=True)
class AccessLogEntry:
    pid: int
    method: str
    request_uri: str
    status: int
    request_time: float  # seconds, millisecond resolution (nginx's own clock)
    protocol: str
    remote_port: int
    connection: int
    connection_requests: int


class SlowUpstream:
    """An HTTP/1.1 upstream answering every request after `delay` seconds."""

    def __init__(self, delay: float = 0.2):
        self.delay = delay
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                time.sleep(upstream.delay)
                body = f"slow {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="slow-upstream", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "SlowUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NginxServer:
    """nginx with a static 200 (`/static/...`, `/`), `return 500` (`/error`), a 404 for
    anything else, and `/upstream/...` proxied to `upstream` (HOST:PORT) when given.

    `tls_port=True` (with `ssl_cert`/`ssl_key` paths) adds a TLS listener serving the
    same locations, speaking HTTP/2 too with `http2=True`. `extra_config` is inserted
    verbatim into the server block.
    """

    def __init__(self, *, upstream: str | None = None, workers: int = 2, tls_port: bool = False,
                 ssl_cert: str | None = None, ssl_key: str | None = None, http2: bool = False,
                 extra_config: str = "", env: dict[str, str] | None = None):
        if tls_port and not (ssl_cert and ssl_key):
            raise ServerError("a TLS listener needs ssl_cert and ssl_key")
        self.nginx = nginx_binary()
        self.upstream = upstream
        self.workers = workers
        self.ssl_cert, self.ssl_key = ssl_cert, ssl_key
        self.http2 = http2
        self.extra_config = extra_config
        self.env = env or {}
        self.port = free_port()
        self.tls_port = free_port() if tls_port else None
        self.prefix = tempfile.mkdtemp(prefix="otel-ebpf-nginx-")
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.pid_file = os.path.join(self.prefix, "nginx.pid")
        self.access_log = os.path.join(self.prefix, "logs", "access.log")
        self.error_log = os.path.join(self.prefix, "logs", "error.log")
        self.master_pid = 0

    # --- files -------------------------------------------------------------------

    def _write_files(self) -> None:
        os.chmod(self.prefix, 0o755)  # workers (nobody) read html/ through it
        for sub in ("logs", "html", "html/static", "temp"):
            os.makedirs(os.path.join(self.prefix, sub), exist_ok=True)
        for name, body in (("index.html", "<h1>otel-ebpf nginx</h1>\n"),
                           ("static/ok.txt", "ok\n")):
            with open(os.path.join(self.prefix, "html", name), "w") as fh:
                fh.write(body)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            path = os.path.join(self.prefix, "temp", sub)
            os.makedirs(path, exist_ok=True)
            if os.geteuid() == 0:
                pw = pwd.getpwnam(WORKER_USER)
                os.chown(path, pw.pw_uid, pw.pw_gid)
        with open(self.conf, "w") as fh:
            fh.write(self.config_text())

    def config_text(self) -> str:
        p = self.prefix
        user = f"user {WORKER_USER} nogroup;" if os.geteuid() == 0 else ""
        listens = [f"listen 127.0.0.1:{self.port};"]
        tls = ""
        if self.tls_port:
            listens.append(f"listen 127.0.0.1:{self.tls_port} ssl{' http2' if self.http2 else ''};")
            tls = f"ssl_certificate {self.ssl_cert};\n        ssl_certificate_key {self.ssl_key};"
        upstream = (f"location /upstream/ {{ proxy_pass http://{self.upstream}; "
                    "proxy_http_version 1.1; proxy_set_header Connection \"\"; }") if self.upstream else ""
        return f"""{user}
worker_processes {self.workers};
error_log {p}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    types {{ text/html html; text/plain txt; }}
    default_type text/plain;
    log_format otel_ebpf_test '{LOG_FORMAT}';
    access_log {p}/logs/access.log otel_ebpf_test;
    client_body_temp_path {p}/temp/client_body;
    proxy_temp_path {p}/temp/proxy;
    fastcgi_temp_path {p}/temp/fastcgi;
    uwsgi_temp_path {p}/temp/uwsgi;
    scgi_temp_path {p}/temp/scgi;
    keepalive_requests 10000;
    server {{
        {' '.join(listens)}
        server_name localhost;
        root {p}/html;
        {tls}
        location /static/ {{ }}
        location = /error {{ return 500; }}
        {upstream}
        {self.extra_config}
    }}
}}
"""

    # --- lifecycle ---------------------------------------------------------------------

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        argv = [self.nginx, "-p", self.prefix, "-c", self.conf, "-g", f"pid {self.pid_file};", *args]
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=30)

    def start(self) -> "NginxServer":
        try:
            self._start()
        except BaseException:
            self.stop()  # a half-started nginx must not outlive the failure
            raise
        return self

    def _start(self) -> None:
        self._write_files()
        test = self._run("-t")
        if test.returncode != 0:
            raise ServerError(f"nginx -t failed: {test.stderr.strip()}")
        r = self._run()  # daemonizes: returns once the master is running
        if r.returncode != 0:
            raise ServerError(f"nginx failed to start: {r.stderr.strip()} {self.log_tail()}")
        self.master_pid = self._read_pid()
        wait_for_port(self.port, timeout=15)
        if self.tls_port:
            wait_for_port(self.tls_port, timeout=15)
        self._wait_workers(set())

    def _read_pid(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(self.pid_file) as fh:
                    return int(fh.read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise ServerError(f"nginx wrote no pid file at {self.pid_file}: {self.log_tail()}")

    def worker_pids(self) -> set[int]:
        """Live children of the master (its workers, old ones still draining included)."""
        out = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as fh:
                    text = fh.read()
            except OSError:
                continue
            fields = text[text.rfind(")") + 2:].split()
            if int(fields[1]) == self.master_pid and fields[0] != "Z":
                out.add(int(name))
        return out

    def _wait_workers(self, old: set[int], timeout: float = 15.0) -> set[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.worker_pids() - old
            if len(new) >= self.workers:
                return new
            time.sleep(0.05)
        raise ServerError(f"nginx started no new workers within {timeout:.0f} s: {self.log_tail()}")

    def reload(self) -> set[int]:
        """`nginx -s reload`; returns the new workers' pids once they run."""
        old = self.worker_pids()
        r = self._run("-s", "reload")
        if r.returncode != 0:
            raise ServerError(f"nginx -s reload failed: {r.stderr.strip()}")
        return self._wait_workers(old)

    def restart(self) -> set[int]:
        """Stop nginx (master and workers) and start it again on the same ports; returns the
        new workers' pids."""
        self._terminate()
        self._start()
        return self.worker_pids()

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def _terminate(self) -> None:
        if self.master_pid:
            try:
                os.kill(self.master_pid, signal.SIGTERM)  # fast shutdown
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.path.exists(f"/proc/{self.master_pid}"):
                time.sleep(0.05)
            if os.path.exists(f"/proc/{self.master_pid}"):
                for pid in self.worker_pids() | {self.master_pid}:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.master_pid = 0
        try:
            os.unlink(self.pid_file)  # a restart waits for the new master's pid file
        except OSError:
            pass

    def __enter__(self) -> "NginxServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- logs ------------------------------------------------------------------------

    def log_tail(self) -> str:
        try:
            with open(self.error_log) as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def access_log_entries(self) -> list[AccessLogEntry]:
        """Every access log line so far (nginx writes each line when the request ends)."""
        try:
            with open(self.access_log, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            parts = line.split("\t")
            if len(parts) != len(LOG_FIELDS):
                continue
            pid, method, uri, status, rt, proto, rport, conn, conn_reqs = parts
            out.append(AccessLogEntry(int(pid), method, uri, int(status), float(rt), proto,
                                      int(rport) if rport.isdigit() else 0, int(conn), int(conn_reqs)))
        return out

    def url(self, path: str, tls: bool = False) -> str:
        return f"https://127.0.0.1:{self.tls_port}{path}" if tls else f"http://127.0.0.1:{self.port}{path}"


# --- demo -------------------------------------------------------------------------------


class NginxDemo:
    """nginx in front of a slow upstream, and a workload mixing 200/404/500/slow requests."""

    name = "nginx"

    def __init__(self, slow_delay: float = 0.3):
        self.upstream = SlowUpstream(slow_delay).start()
        try:
            self.server = NginxServer(upstream=self.upstream.address).start()
        except Exception:
            self.upstream.stop()
            raise

    def workload(self, stop: threading.Event, counts: collections.Counter) -> None:
        """Requests over one keep-alive connection until `stop`: mostly 200s, some 404s,
        500s and slow proxied requests. counts["nginx <status>"] += 1 per response."""
        rng = random.Random(4)
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not stop.is_set():
            n += 1
            roll = rng.random()
            path = ("/upstream/orders" if roll < 0.05 else "/error" if roll < 0.12
                    else f"/missing/{n}" if roll < 0.25 else f"/static/ok.txt?page={n % 7}")
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
                conn.request("GET", path, headers={"User-Agent": "otel-ebpf-demo"})
                resp = conn.getresponse()
                resp.read()
                counts[f"nginx {resp.status}"] += 1
            except (OSError, http.client.HTTPException):
                counts["nginx connection error"] += 1
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(0.2)
                continue
            stop.wait(0.02)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.server.stop()
        self.upstream.stop()


def demo_server() -> NginxDemo:
    return NginxDemo()
