"""Units: one target attached to one binary file. The attacher plans, compiles and attaches
them, detaches them, and drops in-flight starts of threads that vanished.

Compiling goes through `compile_fn` (bpf.compile_program by default), so that the logic
here runs in unit tests with a fake program in place of bcc.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from . import bpf, process
from .config import Config
from .contract import STAT_MAX, prelude_cflags
from .discovery import Selection, Selectors
from .elf import ElfError
from .targets.base import Target

log = logging.getLogger(__name__)

ATTACHING, READY, FAILED = "attaching", "ready", "failed"
CONST_AGENT_PID, CONST_WALL_MINUS_MONO_NS = 0, 1  # probes/common.h agent_consts


class ProgramLike(Protocol):
    """What the agent needs of a loaded program (bpf.Program; a fake in unit tests)."""

    def attach_uprobe(self, fn_name: str, path: str, offset: int, *, retprobe: bool = False,
                      ref_ctr_offset: int = 0, label: str = "") -> object: ...
    def open_ring_buffer(self, map_name: str = "events") -> None: ...
    def drain(self) -> list[bytes]: ...
    def percpu_sum(self, map_name: str, count: int) -> list[int]: ...
    def percpu_value(self, map_name: str, index: int) -> int: ...
    def table_items(self, map_name: str) -> list[tuple[object, object]]: ...
    def set_array_value(self, map_name: str, index: int, value: int) -> None: ...
    def set_hash_value(self, map_name: str, key: int, value: int) -> None: ...
    def key(self, map_name: str, value: int) -> object: ...
    def table_delete(self, map_name: str, keys: list[object]) -> int: ...
    def detach_all(self) -> None: ...
    def close(self) -> None: ...


CompileFn = Callable[[str, str, list[str]], ProgramLike]


@dataclass
class Unit:
    """One target attached to one binary file."""

    target: Target
    path: str
    file_id: process.FileId
    state: str = ATTACHING
    program: ProgramLike | None = None
    labels: list[str] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    stats: list[int] = field(default_factory=lambda: [0] * STAT_MAX)
    ringbuf_peak: float = 0.0  # highest fill seen at a drain since the last metrics read
    timings: dict[str, float] = field(default_factory=dict)  # plan, compile, attach (s)

    @property
    def key(self) -> tuple[str, process.FileId]:
        return self.target.name, self.file_id


def span_interval_ns(max_spans_per_second: int) -> int:
    """The kernel's span budget per target (probes/common.h within_budget): one span every
    this many ns beyond bursts; 0 = no budget."""
    return 1_000_000_000 // max_spans_per_second if max_spans_per_second > 0 else 0


def agent_cflags(config: Config) -> list[str]:
    """-D cflags every program gets: the shared constants and this agent's settings."""
    interval = span_interval_ns(config.max_spans_per_second)
    return [*prelude_cflags(), f"-DRINGBUF_PAGES={config.ringbuf_pages}",
            f"-DSAMPLE_PERMILLE={round(config.sample_ratio * 1000)}",
            f"-DSLOW_NS={int(config.slow_threshold_ms * 1_000_000)}ULL",
            f"-DSPAN_INTERVAL_NS={interval}ULL",
            # A burst of `span_burst` spans fits at once: the budget's due time may run
            # that many intervals ahead of now.
            f"-DSPAN_BURST_NS={interval * max(config.span_burst - 1, 0)}ULL",
            f"-DPID_FILTER={pid_filter_mode(Selectors.of(config))}",
            f"-DPARENT_BASED={int(config.traces_sampler.startswith('parentbased_'))}"]


def set_agent_consts(program: ProgramLike) -> None:
    """What the kernel side needs that only this run knows (probes/common.h agent_consts):
    the agent's pid, and the wall clock minus the monotonic one (nginx dates requests it
    rejected early on the wall clock)."""
    program.set_array_value("agent_consts", CONST_AGENT_PID, os.getpid())
    program.set_array_value("agent_consts", CONST_WALL_MINUS_MONO_NS, time.time_ns() - time.monotonic_ns())


def pid_filter_mode(selectors: Selectors) -> int:
    """probes/common.h PID_FILTER: 0 every process, 1 only listed ones, 2 all but listed."""
    if not selectors.by_process:
        return 0
    return 1 if selectors.include_ports or selectors.include_containers else 2


def default_compile_fn() -> tuple[CompileFn, bool]:
    """(how programs are made, whether several may be made at once): compiled in child
    processes and cached, then loaded without bcc (compiler.py); in this process with bcc
    when libbpf is missing (bcc's compiler is not thread-safe: one at a time)."""
    from .compiler import Compiler, loader_available
    ok, why = loader_available()
    if ok:
        return Compiler(), True
    log.warning("compiling in the agent's own process (%s): slower starts, more memory", why)
    return bpf.compile_program, False


class Attacher:
    def __init__(self, config: Config, compile_fn: CompileFn | None = None, concurrent: bool = False):
        self.config = config
        if compile_fn is None:
            compile_fn, concurrent = default_compile_fn()
        self.compile_fn = compile_fn
        self.concurrent = concurrent  # units may be attached from several threads at once
        self.units: dict[tuple[str, process.FileId], Unit] = {}
        self._lock = threading.Lock()

    def new_units(self, found: Iterable[tuple[Target, str, process.FileId]]) -> list[Unit]:
        """Units for binaries not seen before (state ATTACHING), registered at once so that
        /readyz can name them while they compile."""
        fresh = []
        with self._lock:
            for target, path, fid in found:
                if (target.name, fid) in self.units:
                    continue
                unit = self.units[(target.name, fid)] = Unit(target, path, fid)
                fresh.append(unit)
        return fresh

    def attach_all(self, units: list[Unit]) -> None:
        """Attach new units: side by side when compiles run in child processes (each unit is
        ready, for /readyz, as soon as its own program is), else one after the other."""
        if self.concurrent and len(units) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(len(units), 8), thread_name_prefix="otel-ebpf-attach") as pool:
                list(pool.map(self.attach, units))
        else:
            for unit in units:
                self.attach(unit)
        if units and not self.concurrent:
            bpf.release_compiler_memory()
        release = getattr(self.compile_fn, "release", None)
        if units and release is not None:
            release()  # the compiler children go, with their memory

    def attach(self, unit: Unit) -> Unit:
        """Plan, compile and attach one unit; a failure is the unit's state, never raised."""
        t0 = time.monotonic()
        try:
            plan = unit.target.plan(unit.path, self.config)
            unit.notes = plan.notes
            t1 = time.monotonic()
            program = self.compile_fn(f"{unit.target.name}:{unit.path}", unit.target.c_file,
                                      [*plan.cflags, *agent_cflags(self.config)])
            unit.program = program
            set_agent_consts(program)
            t2 = time.monotonic()
            for spec in plan.attach:
                program.attach_uprobe(spec.fn_name, unit.path, spec.offset, retprobe=spec.retprobe,
                                      ref_ctr_offset=spec.ref_ctr_offset, label=spec.label)
                unit.labels.append(spec.label)
            program.open_ring_buffer()
            unit.timings = {"plan": t1 - t0, "compile": t2 - t1, "attach": time.monotonic() - t2}
            unit.state = READY
            log.info("%s: attached %d probes to %s", unit.target.name, len(unit.labels), unit.path)
            for note in plan.notes:
                log.info("%s: %s", unit.target.name, note)
        except (ElfError, bpf.BpfError, OSError) as exc:
            self._fail(unit, str(exc))
        except Exception as exc:  # noqa: BLE001 - a target's bug must not stop the others
            log.exception("%s: attaching to %s failed", unit.target.name, unit.path)
            self._fail(unit, f"{exc.__class__.__name__}: {exc}")
        return unit

    def _fail(self, unit: Unit, error: str) -> None:
        unit.error = error
        unit.state = FAILED
        log.warning("%s: cannot attach to %s: %s", unit.target.name, unit.path, error)
        if unit.program is not None:
            unit.program.close()
            unit.program = None
        unit.labels.clear()

    def apply_selection(self, selection: Selection, proc_exists: Callable[[int], bool] | None = None) -> None:
        """Put the selected (or, in deny mode, the excluded) processes in every program's
        pid filter; drop entries of processes that are gone (the kernel adds children)."""
        if selection.pids is None:
            return
        exists = proc_exists or (lambda pid: os.path.exists(f"/proc/{pid}"))
        for unit in self.attached():
            program = unit.program
            if program is None:
                continue
            try:
                known = {k.value for k, _ in program.table_items("pid_filter")}
                for pid in selection.pids - known:
                    program.set_hash_value("pid_filter", pid, 1)
                program.table_delete("pid_filter", [program.key("pid_filter", p) for p in known
                                                    if not exists(p)])
            except Exception:  # noqa: BLE001 - a program closing under us
                log.debug("updating the pid filter of %s failed", unit.path, exc_info=True)

    def parents_seen(self, target_names: set[str], until_mono_ns: int) -> None:
        """Tell the kernel side of these targets that their spans join traces lately: until
        `until_mono_ns` it looks for a sampled parent in spans the budget drops."""
        for unit in self.attached():
            if unit.target.name in target_names and unit.program is not None:
                try:
                    unit.program.set_array_value("parents_until", 0, until_mono_ns)
                except Exception:  # noqa: BLE001 - a program closing under us, or without the map
                    log.debug("setting parents_until of %s failed", unit.path, exc_info=True)

    def attached(self) -> list[Unit]:
        """Units whose program runs (READY)."""
        with self._lock:
            return [u for u in self.units.values() if u.program is not None and u.state == READY]

    def all_units(self) -> list[Unit]:
        with self._lock:
            return list(self.units.values())

    def expire_inflight(self, proc_exists: Callable[[int], bool] | None = None) -> int:
        """Drop in-flight starts of threads that exited mid-operation; returns how many."""
        exists = proc_exists or (lambda tid: os.path.exists(f"/proc/{tid}"))
        expired = 0
        for unit in self.attached():
            if not unit.target.inflight_keyed_by_tid or unit.program is None:
                continue
            try:
                gone = [k for k, _v in unit.program.table_items("inflight") if not exists(k.value)]
                expired += unit.program.table_delete("inflight", gone)
            except Exception:  # noqa: BLE001 - racing shutdown
                log.debug("expiring in-flight entries of %s failed", unit.path, exc_info=True)
        return expired

    def detach_all(self) -> None:
        """Every probe off. The kernel takes about 0.1 s to remove each uprobe (it waits for
        a grace period); programs detach side by side, which overlaps some of that wait."""
        programs = [u for u in self.all_units() if u.program is not None]

        def detach(unit: Unit) -> None:
            try:
                unit.program.detach_all()  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - exiting anyway
                log.debug("detaching %s failed", unit.path, exc_info=True)

        if len(programs) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(programs), thread_name_prefix="otel-ebpf-detach") as pool:
                list(pool.map(detach, programs))
        elif programs:
            detach(programs[0])

    def close_all(self) -> None:
        for unit in self.all_units():
            if unit.program is not None:
                unit.program.close()
                unit.program = None
