"""The agent as the benchmarks run it: tests/support/agent.py's AgentProcess (the one
runner the integration tests use too), started in a session of its own through
procs.spawn (so that the bench always stops it), with the SDK's own export intervals
(as shipped: no TEST_ENV), exporting OTLP/gRPC to a receiver in the bench, and errors
as BenchError. Plus the ways the throughput benchmarks run it (AGENT_VARIANTS)."""
from __future__ import annotations

import os
import signal
import subprocess

from tests.support.agent import AgentProcess

from .procs import BenchError, forget, kill_leftovers, spawn, tmp_dir


class BenchAgent(AgentProcess):
    TEST_ENV: dict[str, str] = {}  # as shipped: the SDK's export intervals
    poll_interval = 0.02  # start-up is measured: poll /readyz often

    def __init__(self, *args: str, receiver=None, env: dict[str, str] | None = None, prometheus: bool = False,
                 label: str = "agent", accept_degraded: bool = False):
        extra = {}
        if receiver is not None:
            extra.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
        super().__init__(*args, env={**extra, **(env or {})}, accept_degraded=accept_degraded,
                         prometheus_port=True if prometheus else None,
                         log_path=os.path.join(tmp_dir(), f"{label}-{os.getpid()}-{id(self):x}.log"))
        self.on_spawn = None  # called with the process right after it started (start-up sampling)

    def _popen(self, argv: list[str], stdout) -> subprocess.Popen:
        proc = spawn(argv, env=self.env, stdout=stdout, stderr=subprocess.STDOUT, text=False)
        if self.on_spawn is not None:
            self.on_spawn(proc)
        return proc

    def start(self, timeout: float = 30.0) -> "BenchAgent":
        try:
            super().start(timeout)
        except AssertionError as exc:
            raise BenchError(str(exc).splitlines()[0] + " " + self.log_tail(800)) from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:  # type: ignore[override]
        if self.proc is None:
            return None
        rc = super().stop(sig, timeout)
        kill_leftovers(self.proc)  # a compiler child left behind by an agent that was killed
        forget(self.proc)
        return rc


def span_limit_default() -> int | None:
    """The agent's default span rate limit (spans/s; 0 = none), None when it has none."""
    from otel_ebpf.config import Config

    return getattr(Config(), "max_spans_per_second", None)


# The agent as the throughput benchmarks run it: (extra CLI args, extra environment).
AGENT_VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # As shipped: sampling off (every operation may become a span), the default span budget.
    "agent (defaults)": ((), {}),
    # Every operation a span: no span budget.
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
        text += (f" and its default span budget ({limit:,} spans/s, a burst of one second's worth: above it the "
                 "kernel samples spans down; histograms stay exact); agent, every span: `--max-spans-per-second 0`")
    return text + "; agent, spans off: `OTEL_TRACES_SAMPLER=always_off` (only the kernel side works)"


def agent_run_note(before: dict, after: dict, operations: str, bench_cores: float) -> str:
    """What the agent did in one run, from its /healthz before and after (drained):
    `operations` says what the load generator counted, e.g. "509,739 requests"."""
    def delta(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    return (f"{delta('events_seen'):,} spans from the kernel for {operations}, {delta('spans_sampled_out'):,} "
            f"sampled out, {delta('events_lost'):,} lost in the ring buffer, {delta('spans_dropped'):,} dropped, "
            f"{delta('spans_exported'):,} exported; the OTLP receiver (in the bench process) used "
            f"{bench_cores:.2f} cores")
