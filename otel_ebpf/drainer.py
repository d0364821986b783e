"""Ring buffer records -> spans: drain every attached program in batches, decode, and let
targets hand over spans they held back. Pure logic over `ProgramLike`s."""
from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from typing import Callable

from .attacher import Unit
from .targets.base import DecodeContext, SpanData, Target

log = logging.getLogger(__name__)
IDLE_DRAIN_S = 0.1  # the longest wait between drains while few records come
QUIET_RECORDS = 64  # a drain finding fewer: the next one may wait longer
IDLE_WAKE_S = 1.0  # with nothing arriving, wake this often anyway (held spans, expiries)
RECORD_OVERHEAD = 8  # bytes the ring buffer adds to each record (its header)


def next_drain_wait(records: int, wait_s: float, busy_wait_s: float) -> float:
    """Seconds until the next drain: `busy_wait_s` while records come in numbers; after a
    drain that found fewer than QUIET_RECORDS the wait doubles, up to IDLE_DRAIN_S (a
    quiet agent wakes ten times a second, not fifty: each wake costs the same whatever
    it finds; the ring buffer holds that long at thousands of records/s, and the kernel's
    span budget caps kept records at max_spans_per_second)."""
    if records >= QUIET_RECORDS:
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


class WakeableEvent(threading.Event):
    """A stop event that also interrupts Drainer.wait_for_records (through a pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        super().set()
        try:
            os.write(self._w, b"x")
        except OSError:  # the pipe is full: a wake-up is pending already
            pass


class Drainer:
    def __init__(self, ctx: DecodeContext, units: Callable[[], list[Unit]], targets: Callable[[], list[Target]],
                 ringbuf_bytes: int):
        self.ctx = ctx
        self._units = units
        self._targets = targets
        self._ringbuf_bytes = ringbuf_bytes
        self.counts = collections.Counter[str]()  # spans.dropped.decode_error
        self._epoll = select.epoll()
        self._watched: set[int] = set()

    def wait_for_records(self, timeout_s: float, stop: WakeableEvent) -> None:
        """Sleep until a ring buffer has records, `stop` is set, or `timeout_s` passes: an
        agent with little to do wakes when there is something, not ten times a second.
        Programs without a pollable ring buffer (bcc's) get a plain wait of IDLE_DRAIN_S."""
        fds = {stop.fileno()}
        for unit in self._units():
            ready_fd = getattr(unit.program, "ready_fd", None) if unit.program is not None else None
            fd = ready_fd() if ready_fd else None
            if unit.program is not None and fd is None:
                stop.wait(min(timeout_s, IDLE_DRAIN_S))
                return
            if fd is not None:
                fds.add(fd)
        for fd in fds - self._watched:
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except OSError:  # FileExistsError: a closed fd's number came back
                self._epoll.modify(fd, select.EPOLLIN)
        for fd in self._watched - fds:
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed already: epoll forgot it
                pass
        self._watched = fds
        if not stop.is_set():
            self._epoll.poll(timeout_s)

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
