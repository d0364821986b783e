"""`otel-ebpf demo`'s HTTPS: nginx with a self-signed certificate and curl as the client.

The client runs as separate curl processes: the agent ignores its own process, so
requests made from inside the demo would not show up as CLIENT spans.
"""
from __future__ import annotations

import collections
import os
import random
import shutil
import subprocess
import tempfile
import threading

from . import ServerError
from .nginx import NginxServer


def self_signed_cert(directory: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ServerError(f"openssl req failed: {r.stderr.strip()}")
    return cert, key


class HttpsDemo:
    name = "openssl"

    def __init__(self) -> None:
        if shutil.which("curl") is None:
            raise ServerError("curl is not installed")
        self.dir = tempfile.mkdtemp(prefix="otel-ebpf-https-")
        cert, key = self_signed_cert(self.dir)
        self.server = NginxServer(tls_port=True, ssl_cert=cert, ssl_key=key).start()

    def workload(self, stop: threading.Event, counts: collections.Counter) -> None:
        rng = random.Random(11)
        while not stop.is_set():
            path = rng.choice(["/", "/index.html", "/missing", "/error"])
            r = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                "-A", "otel-ebpf-demo", self.server.url(path, tls=True)],
                               capture_output=True, text=True)
            counts[f"https {r.stdout.strip() or 'failed'}"] += 1
            stop.wait(0.2)

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def demo_server() -> HttpsDemo:
    return HttpsDemo()
