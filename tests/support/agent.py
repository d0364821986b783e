"""Run the real agent as a subprocess, the way a user does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from otel_ebpf.servers import free_port


class AgentProcess:
    """The agent as shipped: its defaults, except what a test passes in `args` or `env`
    (and a free health port, and exports every 200 ms / 1 s so that tests need not wait)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, accept_degraded: bool = False,
                 health_port: int | None = None):
        self.health_port = health_port or free_port()
        self.accept_degraded = accept_degraded
        self.args = ["run", "--health-addr", f"127.0.0.1:{self.health_port}", *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        self.env = {**base, "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                    **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix="otel-ebpf-agent-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []  # e.g. setpriv to run with fewer privileges
        self.returncode: int | None = None
        self.stop_seconds: float | None = None

    def start(self, timeout: float = 30.0) -> "AgentProcess":
        os.chmod(self.log.name, 0o666)  # an agent run as another user still writes its log
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "otel_ebpf.cli", *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                code, status = self.health("/readyz")
            except (OSError, ValueError):
                code, status = 0, {}
            if code == 200:
                if status.get("status") == "degraded" and not self.accept_degraded:
                    self.stop()  # never leave a half-attached agent behind
                    raise AssertionError(f"agent could not attach: {status}\n{self.output()}")
                self.started_status = status
                return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"agent not healthy after {timeout} s:\n{self.output()}")

    def health(self, path: str = "/healthz") -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.stop_seconds = time.monotonic() - t0
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> "AgentProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
