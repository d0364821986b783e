"""The agent's HTTP endpoints: /healthz (alive), /readyz (every probe attempt done) and,
on its own address, /metrics (Prometheus text).

/healthz answers 200 while the agent runs, degraded or not: a binary somewhere on the
host that cannot be attached must not make orchestrators restart the agent. It answers
503 only while the agent is stopping. /readyz answers 503 while probes are still being
attached (its body says which targets are ready already), then 200; units that failed
are listed with their reason (status "degraded").
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

# (path, request headers) -> (status, content type, body)
Responder = Callable[[str, Mapping[str, str]], tuple[int, str, bytes]]


def json_response(code: int, body: dict) -> tuple[int, str, bytes]:
    return code, "application/json", (json.dumps(body) + "\n").encode()


def health_responder(status: Callable[[], dict]) -> Responder:
    """/healthz and /readyz from one status() dict (see Agent.status)."""

    def respond(path: str, headers: Mapping[str, str] | None = None) -> tuple[int, str, bytes]:
        path = path.rstrip("/")
        if path not in ("/healthz", "/readyz"):
            return 404, "text/plain", b"not found\n"
        st = status()
        if path == "/healthz":
            return json_response(503 if st["status"] == "stopping" else 200, st)
        return json_response(200 if st["ready"] else 503, st)

    return respond


def serve(addr: str, respond: Responder) -> ThreadingHTTPServer:
    """Serve GET requests on HOST:PORT from a daemon thread; OSError if the port is taken."""
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            try:
                code, ctype, body = respond(self.path.split("?", 1)[0], self.headers)
            except Exception:  # noqa: BLE001 - an endpoint bug must not kill the thread
                code, ctype, body = 500, "text/plain", b"internal error\n"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"otel-ebpf-http-{port}", daemon=True).start()
    return server


def close(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
