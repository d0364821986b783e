"""What every target provides, and the records that flow from targets to exporters.

A target is one self-contained unit: where to attach (from a binary's ELF), which
C file to compile with which -D constants, how to turn its ring buffer records
into spans. The pipeline owns everything else (compiling, attaching, draining,
resources, export, metrics).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

# Span kinds as OTLP numbers them (opentelemetry.proto.trace.v1.Span.SpanKind).
KIND_SERVER = 2
KIND_CLIENT = 3

# Indexes of the `stats` array every probe file defines (probes/common.h).
STAT_EVENTS, STAT_LOST, STAT_UNMATCHED, STAT_SAMPLED_OUT, STAT_OPERATIONS = range(5)
STAT_MAX = 8

# First-keyword statement kinds the kernel tells apart (probes/common.h sql_operation()).
SQL_OPERATIONS = ("_OTHER", "SELECT", "INSERT", "UPDATE", "DELETE", "BEGIN", "COMMIT", "ROLLBACK", "WITH",
                  "CALL", "CREATE", "DROP", "ALTER", "SET", "SHOW", "COPY", "REPLACE", "TRUNCATE", "EXPLAIN")

# Stable duration buckets of http.server.request.duration and db.client.operation.duration (s).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class SpanData:
    """One finished operation, ready for export. Plain slots: this is the hot path."""

    __slots__ = ("name", "kind", "start_ns", "end_ns", "error", "status_message",
                 "attributes", "resource_pid", "target", "trace_id", "span_id")

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
        self.trace_id: bytes | None = None  # set when the span is kept (exemplars and logs link to it)
        self.span_id: bytes | None = None

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True)
class AttachSpec:
    """One probe point: a BPF function at a file offset of a binary."""

    fn_name: str
    offset: int
    label: str  # shown in doctor/healthz, e.g. "postgresql:query__start"
    retprobe: bool = False
    ref_ctr_offset: int = 0


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


class DecodeContext:
    """What decoding needs from the pipeline: the clock offset and the config."""

    def __init__(self, mono_to_epoch_ns: int, config: object):
        self.mono_to_epoch_ns = mono_to_epoch_ns
        self.config = config


class Target(ABC):
    name: ClassVar[str]  # as in --targets, e.g. "postgres"
    c_file: ClassVar[str]  # in probes/
    # The duration metric this target's spans feed, and its low-cardinality attributes.
    duration_metric: ClassVar[str]
    metric_attributes: ClassVar[tuple[str, ...]]
    # True when the C file keeps the `hist`/`hist_sum` maps and samples before the ring
    # buffer (probes/common.h): the pipeline then reads durations from the kernel and
    # neither records them from spans nor samples spans again.
    kernel_histograms: ClassVar[bool] = False
    # True when the C file's `inflight` LRU map is keyed by thread id (u32): the pipeline then
    # deletes entries of threads that no longer exist (a process killed mid-operation) and
    # counts them as unmatched, instead of waiting for LRU eviction to drop them silently.
    inflight_keyed_by_tid: ClassVar[bool] = False

    def hist_attributes(self, dim: int) -> dict[str, object]:
        """Metric attributes of a kernel histogram key (`dim` of struct hist_key)."""
        return {}

    def metric_of(self, span: SpanData) -> tuple[str, tuple[str, ...]]:
        """The duration metric a span feeds and its attribute names (CLIENT and SERVER differ)."""
        return self.duration_metric, self.metric_attributes

    malformed_records: int = 0  # records too short or inconsistent to decode (counted, never fatal)

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
    def plan(self, path: str, config: object) -> BuildPlan:
        """cflags and probe points for one binary; raises ElfError when unusable."""

    @abstractmethod
    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        """Turn raw ring buffer records into spans."""

    def flush(self, now_mono_ns: int, ctx: DecodeContext, final: bool = False) -> Iterable[SpanData]:
        """Spans held back while waiting for a record that may follow (default: none)."""
        return ()

    def resource_process(self, pid: int) -> int:
        """The pid whose Resource a span from `pid` belongs to (default: itself)."""
        return pid
