"""A trace as text: spans as bars on a time line, children under their parents.

Used by the docs (docs/trace-context.md shows a request the tests produced) and by
`tests/integration/test_trace_context.py`, which renders what the receiver got."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

KIND = {1: "internal", 2: "server", 3: "client"}


@dataclass(frozen=True)
class Bar:
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    span_id: bytes
    parent_span_id: bytes


def render(bars: Iterable[Bar], width: int = 48) -> str:
    """One line per span, depth-first from the roots, with a bar scaled to the trace."""
    bars = list(bars)
    if not bars:
        return ""
    by_parent: dict[bytes, list[Bar]] = {}
    ids = {b.span_id for b in bars}
    for b in bars:
        by_parent.setdefault(b.parent_span_id if b.parent_span_id in ids else b"", []).append(b)
    t0 = min(b.start_ns for b in bars)
    total = max(max(b.end_ns for b in bars) - t0, 1)
    label_width = max(len(_label(b, d)) for b, d in _walk(by_parent, b"", 0))
    lines = []
    for bar, depth in _walk(by_parent, b"", 0):
        first = round((bar.start_ns - t0) * width / total)
        last = max(round((bar.end_ns - t0) * width / total), first + 1)
        track = " " * first + "█" * (last - first)
        ms = (bar.end_ns - bar.start_ns) / 1e6
        lines.append(f"{_label(bar, depth):<{label_width}}  |{track:<{width}}| {ms:8.2f} ms")
    return "\n".join(lines)


def _label(bar: Bar, depth: int) -> str:
    return f"{'  ' * depth}{bar.service}: {bar.name} ({KIND.get(bar.kind, bar.kind)})"


def _walk(by_parent: dict[bytes, list[Bar]], parent: bytes, depth: int):
    for bar in sorted(by_parent.get(parent, []), key=lambda b: b.start_ns):
        yield bar, depth
        yield from _walk(by_parent, bar.span_id, depth + 1)
