"""What every benchmark shares: child processes that are always stopped, the agent as a
subprocess, bpftrace, a counting OTLP receiver, /proc readings, tables and PASS/MISS.

Every process a benchmark starts goes through `spawn()` (its own session, so that a
Ctrl-C at the terminal reaches only the bench, which then stops its children in
order) and is registered: `stop_all()` (run at exit and on SIGTERM/SIGHUP) ends the
ones still running, by their own process ids.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from otel_ebpf.servers import free_port  # noqa: E402
from tests.support.otlp import OtlpReceiver  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark cannot go on (a tool is missing, a server did not start, ...)."""


# --- temp dirs and child processes --------------------------------------------------------

_children: list[subprocess.Popen] = []
_tmp_root: str | None = None


def tmp_dir() -> str:
    """One temp dir for the whole run (logs, scripts); removed at exit."""
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = tempfile.mkdtemp(prefix="otel-ebpf-bench-")
    return _tmp_root


def _unlimited_memlock() -> None:
    # bpftrace and bcc tools warn without it on kernels that still charge memlock.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def spawn(argv: list[str], *, env: dict[str, str] | None = None, stdout=None, stderr=None,
          text: bool = True) -> subprocess.Popen:
    """Start a child in its own session (a process group of its own) and remember it."""
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                            text=text, start_new_session=True)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Signal a child started by spawn() (its own process group, by its id), wait, kill if needed."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


def stop_all() -> None:
    for proc in list(_children):
        stop(proc, signal.SIGTERM, timeout=10.0)
    if _tmp_root is not None:
        shutil.rmtree(_tmp_root, ignore_errors=True)


def install_cleanup() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C (finally blocks run); children are stopped at exit."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    _unlimited_memlock()  # inherited by every child (no preexec_fn: that forces fork() under gRPC threads)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    atexit.register(stop_all)


def run(argv: list[str], timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    """A short command to completion (through spawn, so that Ctrl-C stops it too)."""
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        stop(proc, signal.SIGKILL)
        raise
    if proc in _children:
        _children.remove(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def require_tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if path is None:
        raise BenchError(f"{name} is not installed")
    return path


# --- /proc -------------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (all its threads); with `children`, also of its reaped children."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat(int(name))
            if f is not None and int(f[1]) == pid:
                out.append(int(name))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU of a server: the root (with its reaped children: exited backends) and live children."""
    return cpu_seconds(root, children=True) + sum(cpu_seconds(c, children=True) for c in children_of(root))


_TRACER_RE = re.compile(r"otel_ebpf\.cli run|otel-ebpf run|bpftrace|-bpfcc|/usr/share/bcc/tools/")


class MachineWatch:
    """What else ran on this (shared) machine during a measurement: other processes' CPU
    (in cores) and other eBPF tools (which may have probes on the same binaries)."""

    def __init__(self, own_roots: tuple[int, ...] = ()):
        self.own_roots = {os.getpid(), *own_roots}
        self._t0 = 0.0
        self._cpu0: dict[int, tuple[int, float]] = {}

    def _snapshot(self) -> dict[int, tuple[int, float, int]]:
        out = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            f = _stat(int(name))
            if f is not None:
                out[int(name)] = (int(f[1]), (int(f[11]) + int(f[12])) / CLK_TCK, int(f[19]))
        return out

    def _foreign(self, snap: dict[int, tuple[int, float, int]]) -> set[int]:
        foreign = set()
        for pid in snap:
            p, seen = pid, 0
            while p > 1 and p not in self.own_roots and seen < 64:
                p = snap.get(p, (1,))[0]
                seen += 1
            if p not in self.own_roots:
                foreign.add(pid)
        return foreign

    def start(self) -> "MachineWatch":
        snap = self._snapshot()
        self._cpu0 = {pid: (v[2], v[1]) for pid, v in snap.items()}
        self._t0 = time.monotonic()
        return self

    def stop(self) -> tuple[float, list[str]]:
        """(other processes' CPU in cores, other eBPF tools' command lines) since start()."""
        snap = self._snapshot()
        wall = max(time.monotonic() - self._t0, 1e-3)
        used = 0.0
        tracers = []
        for pid in self._foreign(snap):
            ppid, cpu, start = snap[pid]
            before = self._cpu0.get(pid)
            used += cpu - (before[1] if before and before[0] == start else 0.0)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                continue
            if _TRACER_RE.search(cmd):
                tracers.append(cmd[:120])
        return used / wall, tracers


def foreign_tracers(target: str | None = None) -> list[str]:
    """Command lines of eBPF tools running on this machine that this bench did not start; with
    `target` ("postgres", "nginx"), only those that may have probes on that target's binaries."""
    watch = MachineWatch()
    snap = watch._snapshot()
    out = []
    for pid in watch._foreign(snap):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        cmd = " ".join(argv).strip()
        if not _TRACER_RE.search(cmd):
            continue
        if target is not None and not _may_probe(argv, cmd, target):
            continue
        out.append(cmd[:160])
    return out


def _may_probe(argv: list[str], cmd: str, target: str) -> bool:
    if "otel_ebpf.cli" in cmd or "otel-ebpf" in cmd:
        if "--targets" in argv:
            i = argv.index("--targets")
            return i + 1 < len(argv) and target in argv[i + 1].split(",")
        return not any(a.startswith("--targets=") and target not in a for a in argv)  # all targets
    if target in cmd:
        return True
    for a in argv[1:]:  # a bpftrace script file: does it name the target?
        if a.endswith((".bt", ".py")) and os.path.isfile(a):
            try:
                with open(a, errors="replace") as fh:
                    return target in fh.read()
            except OSError:
                return True
    return "bpftrace" in cmd and "-e" not in argv  # unknown script: assume it may


class QuietWait:
    """Before a measurement, wait (within a budget for the whole run) until no other eBPF tool
    that may probe the same target runs here: on a shared machine another agent's probes on the
    same binary would sit in the "no probes" baseline too."""

    budget_s = 0.0
    waited_s = 0.0

    @classmethod
    def wait(cls, log=None, target: str | None = None) -> list[str]:
        """The tools still running when it gave up ([] when quiet)."""
        tracers = foreign_tracers(target)
        announced = False
        while tracers and cls.waited_s < cls.budget_s:
            if log is not None and not announced:
                log(f"waiting for {len(tracers)} other eBPF tool(s) to finish: {tracers[0][:100]}")
                announced = True
            time.sleep(1.0)
            cls.waited_s += 1.0
            tracers = foreign_tracers(target)
        return tracers


def noise_note(other_cores: float, tracers: list[str]) -> str:
    notes = []
    if other_cores >= 0.1:
        notes.append(f"other load {other_cores:.1f} cores")
    if tracers:
        notes.append(f"{len(tracers)} other eBPF tool(s) running")
    return "; ".join(notes)


# --- OTLP receiver -------------------------------------------------------------------------

class CountingReceiver(OtlpReceiver):
    """tests/support/otlp.py's receiver (real gRPC/HTTP OTLP), counting spans instead of keeping
    them (a benchmark sends millions); metric and log requests are kept as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.span_count = 0

    def _add(self, target: list, request) -> None:
        if target is self.trace_requests:
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with self._lock:
                self.span_count += n
                self._lock.notify_all()
            return
        super()._add(target, request)


# --- the agent -------------------------------------------------------------------------------

class Agent:
    """`otel-ebpf run` as a subprocess, exporting OTLP/gRPC to `receiver` (when given)."""

    def __init__(self, *args: str, receiver: OtlpReceiver | None = None, env: dict[str, str] | None = None,
                 prometheus: bool = False, label: str = "agent"):
        self.health_port = free_port()
        self.prom_port = free_port() if prometheus else None
        self.argv = [sys.executable, "-m", "otel_ebpf.cli", "run", "--health-addr", f"127.0.0.1:{self.health_port}",
                     *(["--prometheus-addr", f"127.0.0.1:{self.prom_port}"] if prometheus else []), *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        if receiver is not None:
            base.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
        self.env = {**base, **(env or {})}
        self.log_path = os.path.join(tmp_dir(), f"{label}-{self.health_port}.log")
        self.proc: subprocess.Popen | None = None
        self.healthy_after: float | None = None  # seconds from start to /healthz 200
        self.settled_after: float | None = None  # seconds from start to "ok" or "degraded"
        self.degraded: str = ""  # what could not be attached, when degraded

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0, accept_degraded: bool = False) -> "Agent":
        """Start and wait for /healthz 200; `healthy_after` is the time that took (s). A degraded
        agent (some binary could not be attached) is an error unless `accept_degraded`."""
        log = open(self.log_path, "w")
        t0 = time.monotonic()
        self.proc = spawn(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        last: tuple[int, dict] = (0, {})
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise BenchError(f"agent exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                last = self.health()
            except OSError:
                time.sleep(0.02)
                continue
            if last[0] == 200:
                self.healthy_after = self.settled_after = time.monotonic() - t0
                return self
            if last[1].get("status") == "degraded":
                self.settled_after = time.monotonic() - t0
                self.degraded = "; ".join(f"{t['target']} {t['path']}: {t.get('error')}"
                                          for t in last[1].get("targets", []) if t.get("error"))
                if accept_degraded:
                    return self
                self.stop()
                raise BenchError(f"agent degraded after {self.settled_after:.1f} s: {self.degraded}")
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"agent not healthy after {timeout:.0f} s (last {last[0]}): {self.log_tail()}")

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=3) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body or b"{}")
            except ValueError:
                return e.code, {}

    def metrics_text(self) -> str:
        assert self.prom_port is not None, "started without prometheus=True"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.prom_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return status_kb(self.pid, "VmRSS") / 1024

    def memory(self) -> dict[str, float]:
        return {k: status_kb(self.pid, k) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

    def wait_drained(self, timeout: float = 15.0, settle: float = 1.5) -> dict:
        """Wait until every span the kernel handed over is exported or dropped (or counters stop moving)."""
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

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        return stop(self.proc, signal.SIGTERM, timeout=20.0)

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def span_limit_default() -> int | None:
    """The agent's default span rate limit (spans/s; 0 = none), None when it has none."""
    from otel_ebpf.config import Config

    return getattr(Config(), "max_spans_per_second", None)


# The agent as the throughput benchmarks run it: (extra CLI args, extra environment).
AGENT_VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # As shipped: sampling off (every operation may become a span), the default span rate limit.
    "agent (defaults)": ((), {}),
    # Every operation a span: no span rate limit.
    "agent, every span": (("--max-spans-per-second", "0"), {}),
    # OTEL_TRACES_SAMPLER=always_off: only the kernel side works (pairing, exact histograms);
    # the difference to the rows above is what sending operations to Python costs.
    "agent, spans off": ((), {"OTEL_TRACES_SAMPLER": "always_off"}),
}


def agent_cases() -> tuple[str, ...]:
    """The agent rows of a throughput table ("every span" only when the agent has a limit)."""
    if span_limit_default() is None:
        return ("agent (defaults)", "agent, spans off")
    return tuple(AGENT_VARIANTS)


def agent_variant_note() -> str:
    limit = span_limit_default()
    text = "agent (defaults): `otel-ebpf run` with sampling off"
    if limit:
        text += (f" and its default span rate limit ({limit:,} spans/s: above it the kernel samples spans "
                 "down; histograms stay exact); agent, every span: `--max-spans-per-second 0`")
    return text + "; agent, spans off: `OTEL_TRACES_SAMPLER=always_off` (only the kernel side works)"


def prometheus_sum(text: str, metric: str, **labels: str) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != metric:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# --- bpftrace ----------------------------------------------------------------------------------

def collect_lines(proc: subprocess.Popen, lines: list[str], ready_prefix: str) -> threading.Event:
    """Append `proc`'s output lines to `lines` from a thread; the event is set by the first
    line starting with `ready_prefix` (the tool says it is attached), or when output ends."""
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(ready_prefix):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    return ready


class Bpftrace:
    """bpftrace with a script; ready once it printed "Attaching N probes" (+ a short settle)."""

    def __init__(self, script: str, label: str = "bpftrace"):
        self.bin = require_tool("bpftrace")
        self.script_path = os.path.join(tmp_dir(), f"{label}-{os.getpid()}-{time.monotonic_ns()}.bt")
        with open(self.script_path, "w") as fh:
            fh.write(script)
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []

    def start(self, timeout: float = 30.0) -> "Bpftrace":
        self.proc = spawn([self.bin, self.script_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        attached = collect_lines(self.proc, self._lines, "Attaching")
        if not attached.wait(timeout) or self.proc.poll() is not None:
            out = "".join(self._lines)
            self.stop()
            raise BenchError(f"bpftrace did not attach: {out[-800:]}")
        time.sleep(1.0)  # "Attaching" is printed before the probes are; a margin for them
        if self.proc.poll() is not None:
            raise BenchError(f"bpftrace exited: {''.join(self._lines)[-800:]}")
        return self

    def stop(self) -> str:
        """SIGINT (bpftrace prints its maps), then the whole output."""
        stop(self.proc, signal.SIGINT, timeout=30.0)
        time.sleep(0.05)
        return "".join(self._lines)

    @staticmethod
    def scalar(output: str, name: str) -> int | None:
        """The value of a scalar map line such as "@n: 1234" (None when not printed)."""
        m = re.search(rf"^@{re.escape(name)}: (\d+)\s*$", output, re.M)
        return int(m.group(1)) if m else None


# --- results -----------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """(max - min) / median, as a percentage: how noisy the repeats were."""
    if len(values) < 2:
        return "-"
    m = median(values)
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f} %" if m else "-"


@dataclass
class Check:
    name: str
    measured: str
    target: str
    ok: bool | None  # None: could not be measured or decided
    undecided: str = "n/a"  # the verdict shown when ok is None

    @property
    def verdict(self) -> str:
        return self.undecided if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def render(self) -> str:
        out = [f"### {self.title}", ""]
        if self.rows:
            widths = [max(len(str(h)), *(len(str(r[i])) for r in self.rows)) for i, h in enumerate(self.headers)]
            line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
            out.append(line(self.headers))
            out.append("| " + " | ".join("-" * w for w in widths) + " |")
            out += [line(r) for r in self.rows]
        if self.checks:
            out += ["", "| target | measured | verdict |", "| --- | --- | --- |"]
            out += [f"| {c.name}: {c.target} | {c.measured} | **{c.verdict}** |" for c in self.checks]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def fmt_rate(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


@dataclass
class CaseRuns:
    """Every run of one case of a throughput benchmark."""

    name: str
    rates: list[float] = field(default_factory=list)  # requests or transactions per second
    cpu_us: list[float] = field(default_factory=list)  # the server's CPU per operation
    tool_cores: list[float] = field(default_factory=list)
    company: list[bool] = field(default_factory=list)  # another eBPF tool on this target ran then
    company_cmds: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def add(self, rate: float, operations: int, server_cpu_s: float, tool_cores: float, others: list[str],
            noise: str | None) -> None:
        """One run: its rate, the server's CPU per operation, the tool's cores, the other eBPF
        tools that probed the target meanwhile, and what else loaded the machine."""
        self.rates.append(rate)
        self.company.append(bool(others))
        self.company_cmds.update(others)
        self.cpu_us.append(server_cpu_s / max(operations, 1) * 1e6)
        self.tool_cores.append(tool_cores)
        if noise:
            self.notes.append(noise)


def agent_run_note(before: dict, after: dict, operations: str, bench_cores: float) -> str:
    """What the agent did in one run, from its /healthz before and after (drained):
    `operations` says what the load generator counted, e.g. "509,739 requests"."""
    def delta(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    return (f"{delta('events_seen'):,} spans from the kernel for {operations}, {delta('spans_sampled_out'):,} "
            f"sampled out, {delta('events_lost'):,} lost in the ring buffer, {delta('spans_dropped'):,} dropped; "
            f"the OTLP receiver (in the bench process) used {bench_cores:.2f} cores")


def floor_checks(table: "Table", ratios: dict[str, float], labels: dict[str, str], expected: str) -> None:
    """A check per agent case (`labels`: case -> check label): its ratio at least bpftrace's − 0.01."""
    b = ratios["bpftrace"]
    for case, label in labels.items():
        if case in ratios:
            a = ratios[case]
            table.checks.append(Check(label, f"{fmt_ratio(a)} (bpftrace {fmt_ratio(b)})", expected,
                                      None if a != a or b != b else a >= b - 0.01))


def run_interleaved(cases: list[str], repeats: int, run_one, label: str, unit: str, log=print) -> dict[str, CaseRuns]:
    """Run every case `repeats` times, interleaved, the order rotated each repeat (drift hits all alike)."""
    runs = {c: CaseRuns(c) for c in cases}
    for r in range(repeats):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            run_one(case, runs[case])
            log(f"{label}: repeat {r + 1}/{repeats} {case}: "
                f"{fmt_rate(runs[case].rates[-1]) if runs[case].rates else 'failed'} {unit}")
    return runs


def throughput_rows(table: "Table", runs: dict[str, CaseRuns], target: str, per_operation: str) -> dict[str, float]:
    """One row per case (runs, median, spread, ratio to no probes, CPU), notes; the ratios."""
    cases = list(runs)
    base = median(runs["no probes"].rates)
    ratios = {}
    for case in cases:
        cr = runs[case]
        ratios[case] = median(cr.rates) / base if cr.rates and base else float("nan")
        per_run = " / ".join(fmt_rate(x) + ("*" if c else "") for x, c in zip(cr.rates, cr.company))
        table.rows.append([case, per_run, fmt_rate(median(cr.rates)),
                           spread(cr.rates), fmt_ratio(ratios[case]),
                           f"{median(cr.cpu_us):.1f}" if cr.cpu_us else "-",
                           f"{median(cr.tool_cores):.2f}" if cr.tool_cores else "-"])
    cpu_base = median(runs["no probes"].cpu_us)
    for case in cases[1:]:
        if runs[case].cpu_us and cpu_base:
            table.notes.append(f"{case}: {per_operation} {median(runs[case].cpu_us) / cpu_base:.3f}× "
                               "the no-probe run's")
    company = sorted(set().union(*(runs[c].company_cmds for c in cases)))
    if company:
        table.notes.append(f"* another eBPF tool that may probe {target} was running at the start or the end of "
                           f"that run (a shared machine): {'; '.join(c[:90] for c in company[:3])}"
                           + (f" and {len(company) - 3} more" if len(company) > 3 else ""))
    for case in cases:
        for note in dict.fromkeys(runs[case].notes):
            table.notes.append(f"{case}: {note}")
    return ratios
