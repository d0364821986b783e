"""Run the real agent as a subprocess, the way a user does.

The integration tests and the benchmarks (bench/agent.py subclasses it) share this one
runner: start and wait for /readyz, /healthz and /metrics, the agent's CPU and memory
from /proc, waiting until the spans it got are exported, its log.
"""
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

CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMORY_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (fields[0] is the state), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def proc_cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (all its threads); with `children`, also of its reaped children."""
    f = proc_stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile); 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class AgentProcess:
    """The agent as shipped: its defaults, except what a test passes in `args` or `env`
    (and a free health port, and exports every 200 ms / 1 s so that tests need not wait:
    TEST_ENV, which the benchmarks turn off).

    `prometheus_port`: True for a free port (or a port number): `--prometheus-addr`, read
    with metrics_text(). `log_path`: where its output goes (default: a temp file)."""

    TEST_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
    poll_interval = 0.1  # seconds between /readyz polls while starting

    def __init__(self, *args: str, env: dict[str, str] | None = None, accept_degraded: bool = False,
                 health_port: int | None = None, prometheus_port: int | bool | None = None,
                 log_path: str | None = None):
        self.health_port = health_port or free_port()
        self.accept_degraded = accept_degraded
        self.prometheus_port = free_port() if prometheus_port is True else (prometheus_port or None)
        prom = ["--prometheus-addr", f"127.0.0.1:{self.prometheus_port}"] if self.prometheus_port else []
        self.args = ["run", "--health-addr", f"127.0.0.1:{self.health_port}", *prom, *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        self.env = {**base, **self.TEST_ENV, **(env or {})}
        if log_path is None:
            self.log = tempfile.NamedTemporaryFile(prefix="otel-ebpf-agent-", suffix=".log", delete=False)
            self.log.close()  # the agent writes it; output() reads it by name
            log_path = self.log.name
        self.log_path = log_path
        open(self.log_path, "wb").close()
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []  # e.g. setpriv to run with fewer privileges
        self.returncode: int | None = None
        self.stop_seconds: float | None = None
        self.started_status: dict = {}  # /readyz's body once it answered 200
        self.answering_after: float | None = None  # seconds from spawn to the first HTTP answer
        self.ready_after: float | None = None  # seconds from spawn to /readyz 200

    # --- starting and stopping ------------------------------------------------------------

    def _popen(self, argv: list[str], stdout) -> subprocess.Popen:
        """Start the process (the benchmarks start it in a session of their own)."""
        return subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, env=self.env)

    def start(self, timeout: float = 30.0) -> "AgentProcess":
        os.chmod(self.log_path, 0o666)  # an agent run as another user still writes its log
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = self._popen([*self.prefix, sys.executable, "-m", "otel_ebpf.cli", *self.args], log)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                code, status = self.health("/readyz")
            except (OSError, ValueError):
                code, status = 0, {}
            if code and self.answering_after is None:
                self.answering_after = time.monotonic() - t0
            if code == 200:
                self.ready_after = time.monotonic() - t0
                self.started_status = status
                if status.get("status") == "degraded" and not self.accept_degraded:
                    self.stop()  # never leave a half-attached agent behind
                    raise AssertionError(f"agent could not attach: {status}\n{self.output()}")
                return self
            time.sleep(self.poll_interval)
        self.stop()
        raise AssertionError(f"agent not healthy after {timeout} s:\n{self.output()}")

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

    # --- what it says ---------------------------------------------------------------------

    def health(self, path: str = "/healthz") -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metrics_text(self) -> str:
        """/metrics (Prometheus text); needs `prometheus_port`."""
        assert self.prometheus_port, "started without prometheus_port"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.prometheus_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.output()[-n:]
        except OSError:
            return ""

    @property
    def degraded(self) -> str:
        """What could not be attached at start ("" when everything was)."""
        return "; ".join(f"{t.get('target')} {t.get('path')}: {t.get('error')}"
                         for t in self.started_status.get("targets", []) if t.get("error"))

    def timings(self) -> dict[str, dict[str, float]]:
        """Per attached binary ("target path"): seconds of its plan, compile and attach (/readyz)."""
        return {f"{t.get('target')} {t.get('path')}": dict(t.get("seconds", {}))
                for t in self.started_status.get("targets", [])}

    def wait_drained(self, timeout: float = 15.0, settle: float = 1.5) -> dict:
        """/healthz once every span the kernel handed over is exported or dropped (or the
        counters stopped moving for `settle` + 3 s)."""
        # /healthz's kernel counters (events_seen, events_lost) are read once a second by the
        # agent's metrics thread: let them catch up with the end of the load first.
        time.sleep(1.2)
        deadline = time.monotonic() + timeout
        last, still_since = None, time.monotonic()
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.health()[1]
            done = status.get("spans_exported", 0) + status.get("spans_dropped", 0)
            if status.get("queue_length", 1) == 0 and done >= status.get("events_seen", 0):
                return status
            key = (done, status.get("events_seen"))
            if key != last:
                last, still_since = key, time.monotonic()
            elif time.monotonic() - still_since > settle + 3:
                return status
            time.sleep(0.1)
        return status

    # --- the process, from /proc ------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """The agent process's utime + stime so far (its compiler children not included)."""
        return proc_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def memory(self) -> dict[str, float]:
        """VmRSS, VmHWM (the peak), RssAnon, RssFile of the agent process, in MB."""
        return {k: proc_status_kb(self.pid, k) / 1024 for k in MEMORY_KEYS}
