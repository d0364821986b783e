"""W3C trace context from what the watched programs carry: a traceparent (and tracestate)
seen in an HTTP header or a sqlcommenter comment makes the agent's span its child.

Parsing and validation are the OpenTelemetry SDK's own (`TraceContextTextMapPropagator`,
`TraceState`), so the agent accepts exactly what an instrumented service would: a
malformed, all-zero or future-versioned value is ignored as a whole, never half-trusted.
"""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState

if TYPE_CHECKING:
    from .targets.base import SpanData

_PROPAGATOR = TraceContextTextMapPropagator()
MAX_HEADER = 512  # longer values are not a traceparent/tracestate anyone sends
_rand = random.Random()


def new_ids() -> tuple[bytes, bytes]:
    """A random trace id and span id (the agent's own root spans)."""
    bits = _rand.getrandbits(192)
    return (bits >> 64).to_bytes(16, "big"), (bits & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


def new_span_id() -> bytes:
    return _rand.getrandbits(64).to_bytes(8, "big") or b"\0" * 7 + b"\1"


def parse(traceparent: str | bytes | None, tracestate: str | bytes | None = None
          ) -> tuple[bytes, bytes, int, str] | None:
    """(trace id, parent span id, flags, tracestate) of a valid traceparent, else None."""
    if not traceparent:
        return None
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    if len(traceparent) > MAX_HEADER:
        return None
    carrier = {"traceparent": traceparent.strip()}
    if tracestate:
        if isinstance(tracestate, bytes):
            tracestate = tracestate.decode("ascii", "replace")
        if len(tracestate) <= MAX_HEADER:
            carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    parent = trace.get_current_span(context).get_span_context()
    if not parent.is_valid:
        return None
    state = parent.trace_state.to_header() if isinstance(parent.trace_state, TraceState) else ""
    return (parent.trace_id.to_bytes(16, "big"), parent.span_id.to_bytes(8, "big"),
            int(parent.trace_flags), state)


def join(span: "SpanData", traceparent: str | bytes | None, tracestate: str | bytes | None = None) -> bool:
    """Make `span` a child of the given parent; False (span untouched) when it is not valid."""
    parsed = parse(traceparent, tracestate)
    if parsed is None:
        return False
    span.trace_id, span.parent_span_id, span.trace_flags, span.trace_state = parsed
    span.span_id = new_span_id()
    return True


def sampler_drops(span: "SpanData", sampler: str) -> bool:
    """Whether a parent-based sampler leaves out a span whose remote parent was not sampled
    (the SDKs' parentbased_* samplers: a remote unsampled parent means always_off)."""
    return bool(span.parent_span_id) and not span.trace_flags & 1 and sampler.startswith("parentbased_")


def default_sampler(env: dict[str, str] | None = None) -> str:
    return ((env if env is not None else os.environ).get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
