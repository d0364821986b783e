"""What every target provides, and the records that flow from targets to exporters.

A target is one self-contained unit: where to attach (declared as `ProbePoint`s,
resolved against a binary's ELF by `resolve_probe_points`), which C file to compile
with which -D constants, how to turn its ring buffer records into spans. The agent
owns everything else (compiling, attaching, draining, resources, export, metrics).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Iterable

from ..contract import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER  # noqa: F401 - re-exported for targets
from ..elf import ElfError, ElfInfo

if TYPE_CHECKING:
    from ..config import Config


class SpanData:
    """One finished operation, ready for export. Plain slots: this is the hot path."""

    __slots__ = ("name", "kind", "start_ns", "end_ns", "error", "status_message",
                 "attributes", "resource_pid", "target", "trace_id", "span_id", "parent_span_id",
                 "trace_flags", "trace_state")

    def __init__(self, name: str, kind: int, start_ns: int, end_ns: int, attributes: dict,
                 resource_pid: int, target: str, error: bool = False, status_message: str = ""):
        self.name = name
        self.kind = kind
        self.start_ns = start_ns  # Unix epoch nanoseconds
        self.end_ns = end_ns
        self.attributes = attributes
        self.resource_pid = resource_pid  # the process whose Resource this span belongs to
        self.target = target
        self.error = error
        self.status_message = status_message
        # Set when the span is kept (exemplars and logs link to it), or from a parent's
        # trace context (tracecontext.py) which also sets parent_span_id and the flags.
        self.trace_id: bytes | None = None
        self.span_id: bytes | None = None
        self.parent_span_id: bytes = b""
        self.trace_flags: int = 1
        self.trace_state: str = ""

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True)
class ProbePoint:
    """One place a target's program attaches, declared as data.

    Exactly one of `usdt` ("provider:name", every site of the probe) and `symbols`
    (alternative function names, the first one found wins) is set. `within` keeps only
    the USDT sites inside that function's code (its symbol's address range)."""

    fn: str  # the BPF function of the C file
    usdt: str = ""
    symbols: tuple[str, ...] = ()
    retprobe: bool = False
    required: bool = True
    within: str = ""
    label: str = ""  # shown in doctor and /readyz; default: the probe or symbol name

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.usdt:
            return self.usdt
        return f"{self.symbols[0]}(){' return' if self.retprobe else ''}"


@dataclass(frozen=True)
class AttachSpec:
    """One resolved probe point: a BPF function at a file offset of a binary."""

    fn_name: str
    offset: int
    label: str  # shown in doctor/healthz, e.g. "postgresql:query__start"
    retprobe: bool = False
    ref_ctr_offset: int = 0


@dataclass
class Resolution:
    """Probe points resolved against one binary."""

    attach: list[AttachSpec] = field(default_factory=list)
    present: dict[str, bool] = field(default_factory=dict)  # label -> found
    missing_required: list[str] = field(default_factory=list)


def resolve_probe_points(info: ElfInfo, points: Iterable[ProbePoint]) -> Resolution:
    """Where each probe point is in `info`'s binary: file offsets (and USDT semaphores)."""
    out = Resolution()
    for point in points:
        specs = _resolve_one(info, point)
        out.present[point.name] = out.present.get(point.name, False) or bool(specs)
        if not specs and point.required:
            out.missing_required.append(point.name)
        out.attach += specs
    return out


def _resolve_one(info: ElfInfo, point: ProbePoint) -> list[AttachSpec]:
    if point.usdt:
        provider, _, name = point.usdt.partition(":")
        sites = info.usdt(provider, name)
        if point.within:
            fn = info.symbol(point.within)
            if fn is not None and fn.size:
                sites = [s for s in sites if fn.vaddr <= s.pc < fn.vaddr + fn.size]
        return [AttachSpec(point.fn, s.file_offset, point.name, ref_ctr_offset=s.semaphore_offset) for s in sites]
    for symbol in point.symbols:
        sym = info.symbol(symbol)
        if sym is not None and sym.file_offset >= 0:
            return [AttachSpec(point.fn, sym.file_offset, point.name, retprobe=point.retprobe)]
    return []


@dataclass
class BuildPlan:
    """How to compile and attach one target to one binary."""

    cflags: list[str]
    attach: list[AttachSpec]
    notes: list[str] = field(default_factory=list)  # what doctor should tell (missing fields, ...)


@dataclass
class Inspection:
    """What doctor/list report for one binary: usable or not, and why."""

    path: str
    usable: bool
    mechanism: str  # "usdt", "uprobe", ...
    probes: dict[str, bool]  # probe label -> present
    notes: list[str] = field(default_factory=list)
    protocols: dict[str, bool] = field(default_factory=dict)  # e.g. "extended protocol" -> covered


class DecodeContext:
    """What decoding needs from the agent: the clock offset and the config."""

    def __init__(self, mono_to_epoch_ns: int, config: "Config"):
        self.mono_to_epoch_ns = mono_to_epoch_ns
        self.config = config


class Target(ABC):
    name: ClassVar[str]  # as in --targets, e.g. "postgres"
    c_file: ClassVar[str]  # in probes/
    # The duration metric this target's spans feed, and its low-cardinality attributes.
    duration_metric: ClassVar[str]
    metric_attributes: ClassVar[tuple[str, ...]]
    # True when the C file keeps the `hist`/`hist_sum` maps and samples before the ring
    # buffer (probes/common.h): the agent then reads durations from the kernel and
    # neither records them from spans nor samples spans again.
    kernel_histograms: ClassVar[bool] = False
    # True when the C file's `inflight` LRU map is keyed by thread id (u32): the agent then
    # deletes entries of threads that no longer exist (a process killed mid-operation) and
    # counts them as expired, instead of waiting for LRU eviction to drop them silently.
    inflight_keyed_by_tid: ClassVar[bool] = False

    malformed_records: int = 0  # records too short or inconsistent to decode (counted, never fatal)

    def hist_attributes(self, dim: int) -> dict[str, object]:
        """Metric attributes of a kernel histogram key (`dim` of struct hist_key)."""
        return {}

    def hist_series(self, dim: int) -> tuple[str, dict[str, object]]:
        """The metric and attributes a kernel histogram key counts in (one metric per
        target, unless a target such as the USDT catalog has several)."""
        return self.duration_metric, self.hist_attributes(dim)

    def metric_of(self, span: SpanData) -> tuple[str, tuple[str, ...]]:
        """The duration metric a span feeds and its attribute names (CLIENT and SERVER differ)."""
        return self.duration_metric, self.metric_attributes

    def counters(self) -> dict[str, int]:
        """What the target counted or dropped while decoding, by reason (exported as metrics)."""
        return {"malformed_records": self.malformed_records} if self.malformed_records else {}

    @abstractmethod
    def candidate_paths(self) -> list[str]:
        """Well-known install paths of the target's binaries (may not exist)."""

    @abstractmethod
    def matches_process(self, comm: str, exe: str) -> bool:
        """Whether a running process is an instance of this target."""

    def extra_paths(self, procs: list) -> list[str]:
        """More binaries to attach to, from the running processes (list of process.ProcInfo):
        e.g. the shared libraries they map. Default: none."""
        return []

    @abstractmethod
    def inspect(self, path: str) -> Inspection:
        """Which probes the binary offers; never raises for an unusable binary."""

    @abstractmethod
    def plan(self, path: str, config: "Config") -> BuildPlan:
        """cflags and probe points for one binary; raises ElfError when unusable."""

    @abstractmethod
    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        """Turn raw ring buffer records into spans."""

    def flush(self, now_mono_ns: int, ctx: DecodeContext, final: bool = False) -> Iterable[SpanData]:
        """Spans held back while waiting for a record that may follow (default: none)."""
        return ()

    def cache_sizes(self) -> dict[str, int]:
        """Entries in this target's own bounded caches, for /healthz (default: none)."""
        return {}

    def resource_process(self, pid: int) -> int:
        """The pid whose Resource a span from `pid` belongs to (default: itself)."""
        return pid

    def configure(self, config: "Config") -> None:
        """Read what the target needs from the config once, at the agent's start (default:
        nothing). May raise an error that stops the agent (e.g. a bad catalog file)."""

    def check(self, path: str) -> None:
        """Raise when a binary found at the agent's start cannot be used as configured
        (default: never; units that fail later report it in /readyz instead)."""


def require_resolved(path: str, resolution: Resolution, why: str) -> None:
    """Raise ElfError naming the required probe points a binary lacks."""
    if resolution.missing_required:
        raise ElfError(f"{path}: no {', '.join(resolution.missing_required)} ({why})")
