"""Ring buffer records -> spans: drain every attached program in batches, decode, and let
targets hand over spans they held back. Pure logic over `ProgramLike`s."""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from .attacher import Unit
from .targets.base import DecodeContext, SpanData, Target

log = logging.getLogger(__name__)
IDLE_DRAIN_S = 0.1  # the longest wait between drains while nothing comes
RECORD_OVERHEAD = 8  # bytes the ring buffer adds to each record (its header)


def next_drain_wait(records: int, wait_s: float, busy_wait_s: float) -> float:
    """Seconds until the next drain: `busy_wait_s` while records come; after a drain that
    found none the wait doubles, up to IDLE_DRAIN_S (an idle agent wakes less often; the
    ring buffer holds that long at thousands of records/s)."""
    if records:
        return busy_wait_s
    return min(wait_s * 2, max(IDLE_DRAIN_S, busy_wait_s))


def mono_to_epoch_offset() -> int:
    """Nanoseconds to add to CLOCK_MONOTONIC (bpf_ktime_get_ns) to get Unix time."""
    best: tuple[int, int] | None = None
    for _ in range(5):
        a = time.monotonic_ns()
        wall = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, wall - (a + b) // 2)
    assert best is not None
    return best[1]


class Drainer:
    def __init__(self, ctx: DecodeContext, units: Callable[[], list[Unit]], targets: Callable[[], list[Target]],
                 ringbuf_bytes: int):
        self.ctx = ctx
        self._units = units
        self._targets = targets
        self._ringbuf_bytes = ringbuf_bytes
        self.counts = collections.Counter[str]()  # spans.dropped.decode_error

    def poll(self, final: bool = False) -> tuple[int, list[SpanData]]:
        """(records drained, spans decoded) from every attached program."""
        records = 0
        spans: list[SpanData] = []
        for unit in self._units():
            program = unit.program
            if program is None:
                continue
            try:
                raws = program.drain()
            except Exception:  # noqa: BLE001 - a program closed under us at shutdown
                log.debug("draining %s failed", unit.path, exc_info=True)
                continue
            if not raws:
                continue
            records += len(raws)
            # What one drain found is a lower bound of how full the ring buffer got.
            fill = (sum(len(r) for r in raws) + RECORD_OVERHEAD * len(raws)) / self._ringbuf_bytes
            unit.ringbuf_peak = max(unit.ringbuf_peak, min(fill, 1.0))
            try:
                spans.extend(unit.target.decode(raws, self.ctx))
            except Exception:  # noqa: BLE001 - a decoding bug must not stop the agent
                log.exception("%s: decoding %d records failed", unit.target.name, len(raws))
                self.counts["spans.dropped.decode_error"] += len(raws)
        now = time.monotonic_ns()
        for target in self._targets():
            try:
                spans.extend(target.flush(now, self.ctx, final=final))
            except Exception:  # noqa: BLE001
                log.exception("%s: flushing held spans failed", target.name)
        return records, spans
