"""The `usdt` target: the USDT catalog (otel_ebpf/usdt_catalog.py) run by one generic C
file (probes/usdt.c). One program per binary holds every pair the catalog has for it."""
from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Iterable

from opentelemetry.semconv._incubating.attributes import thread_attributes as THREAD

from .. import process
from ..contract import layout
from ..elf import ElfError, ElfInfo, elf_info
from ..usdt_catalog import MAX_SLOTS, MAX_STRINGS, BinarySet, Catalog, CatalogError, Pair, load_catalog
from .base import BuildPlan, DecodeContext, Inspection, ProbePoint, SpanData, Target, resolve_probe_points
from .common import load_base_expr

MAX_PAIRS = 8  # pairs one program serves (probes/usdt.c defines on_start_0..7 and on_done_0..7)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)
STR_MAX = 128  # probes/usdt.h

RECORD = layout("usdt.h", "usdt_event", [
    ("start_ns", "Q"), ("end_ns", "Q"), ("pid", "I"), ("tid", "I"), ("pair", "I"), ("resource_pid", "I"),
    ("args", f"{MAX_SLOTS}Q"), ("str_len", f"{MAX_STRINGS}I"), ("str", f"{MAX_STRINGS * STR_MAX}s"),
])


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def span_name(template: str, attrs: dict[str, object]) -> str:
    """A span name from its template: {attribute.name} becomes the attribute's value (names
    have dots, so this is no str.format); an unknown name stays as written."""
    return _PLACEHOLDER.sub(lambda m: str(attrs.get(m.group(1), m.group(0))), template)


class UsdtCatalogTarget(Target):
    name = "usdt"
    c_file = "usdt.c"
    duration_metric = "otel_ebpf.usdt.duration"
    metric_attributes = ()
    kernel_histograms = True

    def __init__(self, catalog: Catalog | None = None) -> None:
        self._catalog = catalog
        self._pairs: tuple[Pair, ...] | None = None
        self._parents: dict[int, tuple[int, float]] = {}

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog()
            self._pairs = None
        return self._catalog

    @property
    def pairs(self) -> tuple[Pair, ...]:
        """Every pair of the catalog; a pair's index is its number in the kernel."""
        if self._pairs is None:
            self._pairs = tuple(self.catalog.pairs)
        return self._pairs

    def configure(self, config: "Config") -> None:
        """Load the catalog with the user's files (raises CatalogError at start)."""
        self._catalog = load_catalog(config.usdt_catalog)
        self._pairs = None

    # --- where ----------------------------------------------------------------------
    def candidate_paths(self) -> list[str]:
        return sorted({p for s in self.catalog.sets for p in s.candidate_paths()})

    def matches_process(self, comm: str, exe: str) -> bool:
        return any(s.matches_exe(exe) for s in self.catalog.sets)

    def _sets_for(self, path: str, info: ElfInfo) -> list[BinarySet]:
        """The catalog files that apply to a binary: by path, or by the providers it has."""
        providers = {p.provider for p in info.probes}
        return [s for s in self.catalog.sets
                if s.matches_exe(path) or (path.startswith("/proc/") and any(p.provider in providers for p in s.pairs)
                                           and any(info.usdt(p.provider, p.start) for p in s.pairs))]

    def _pairs_for(self, path: str, info: ElfInfo) -> tuple[list[tuple[Pair, BinarySet]], list[str], list[str]]:
        """The pairs that fit the binary (each with its catalog file's set, at most
        MAX_PAIRS), the problems of those that do not, and notes on pairs left out."""
        fitting, problems = [], []
        for s in self._sets_for(path, info):
            for pair in s.pairs:
                problem = self._problem(pair, info)
                if problem:
                    problems.append(f"{pair.name} ({pair.source}): {problem}")
                else:
                    fitting.append((pair, s))
        left_out = []
        if len(fitting) > MAX_PAIRS:
            left_out.append(f"{len(fitting)} catalog pairs fit this binary; one program takes {MAX_PAIRS}: "
                            f"not attached: {', '.join(p.name for p, _ in fitting[MAX_PAIRS:])}")
        return fitting[:MAX_PAIRS], problems, left_out

    @staticmethod
    def _problem(pair: Pair, info: ElfInfo) -> str:
        for probe in (pair.start, pair.done):
            sites = info.usdt(pair.provider, probe)
            if not sites:
                return f"no USDT probe {pair.provider}:{probe} in this binary"
        wanted = [(pair.start if a.probe == "start" else pair.done, a.arg) for a in pair.attributes]
        if pair.key_arg:
            wanted += [(pair.start, pair.key_arg), (pair.done, pair.key_arg)]
        for probe, arg in wanted:
            for site in info.usdt(pair.provider, probe):
                if arg > len(site.args):
                    return f"{pair.provider}:{probe} has {len(site.args)} argument(s), not {arg}"
        return ""

    def inspect(self, path: str) -> Inspection:
        try:
            info = elf_info(path)
        except ElfError as exc:
            return Inspection(path, False, "usdt", {}, [str(exc)])
        fitting, problems, left_out = self._pairs_for(path, info)
        present = {f"{p.provider}:{p.start}/{p.done}": True for p, _ in fitting}
        notes = problems + left_out + [f"{p.name}: {p.describe()}" for p, _ in fitting]
        return Inspection(path, bool(fitting), "usdt", present, notes)

    def check(self, path: str) -> None:
        """Raise CatalogError when an entry cannot work on this binary (the agent's start)."""
        try:
            info = elf_info(path)
        except ElfError:
            return
        _, problems, _ = self._pairs_for(path, info)
        if problems:
            raise CatalogError(f"{path}: {'; '.join(problems)}")

    def plan(self, path: str, config: "Config") -> BuildPlan:
        info = elf_info(path)
        fitting, problems, left_out = self._pairs_for(path, info)
        if not fitting:
            raise ElfError(f"{path}: no catalog pair fits this binary" + (f" ({'; '.join(problems)})" if problems else ""))
        cflags = [f"-DPAIRS={len(fitting)}", f"-DSTR_MAX={STR_MAX}"]
        points = []
        for i, (pair, binary_set) in enumerate(fitting):
            cflags += self._pair_cflags(i, pair, info)
            cflags.append(f"-DP{i}_ID={self.pairs.index(pair)}")
            cflags.append(f"-DP{i}_RESOURCE={self._resource_expr(pair, info, binary_set)}")
            points += [ProbePoint(f"on_start_{i}", usdt=f"{pair.provider}:{pair.start}"),
                       ProbePoint(f"on_done_{i}", usdt=f"{pair.provider}:{pair.done}")]
        resolved = resolve_probe_points(info, points)
        return BuildPlan(cflags, resolved.attach, problems + left_out)

    @staticmethod
    def _resource_expr(pair: Pair, info: ElfInfo, binary_set: BinarySet) -> str:
        """C reading the pid the span's Resource is (a u32 global such as PostmasterPid,
        read at the done probe through the binary's load base), or 0: the process."""
        if binary_set.resource != "symbol":
            return "0"
        sym = info.symbol(binary_set.resource_symbol)
        if sym is None:
            return "0"
        base = load_base_expr(info, [s.pc for s in info.usdt(pair.provider, pair.done)])
        return (f"({{ u32 __pid = 0; bpf_probe_read_user(&__pid, 4, (void *)({base} + {sym.vaddr}ULL)); "
                f"__pid; }})")

    @staticmethod
    def _pair_cflags(i: int, pair: Pair, info: ElfInfo) -> list[str]:
        def arg(probe: str, n: int) -> str:
            return info.usdt_arg_macro(pair.provider, probe, n)

        flags = {f"P{i}_{k}{j}": "0ULL" for k in ("S", "D") for j in range(MAX_SLOTS)}
        flags.update({f"P{i}_{k}{j}": "0ULL" for k in ("SS", "DS") for j in range(MAX_STRINGS)})
        dims = [-1, -1]
        for a in pair.attributes:
            probe = pair.start if a.probe == "start" else pair.done
            if a.type == "string":
                flags[f"P{i}_{'SS' if a.probe == 'start' else 'DS'}{a.slot}"] = arg(probe, a.arg)
            else:
                flags[f"P{i}_{'S' if a.probe == 'start' else 'D'}{a.slot}"] = arg(probe, a.arg)
        for n, name in enumerate(pair.metric_attributes):
            dims[n] = next(a.slot for a in pair.attributes if a.name == name)
        flags[f"P{i}_KEY_START"] = arg(pair.start, pair.key_arg) if pair.key_arg else "0ULL"
        flags[f"P{i}_KEY_DONE"] = arg(pair.done, pair.key_arg) if pair.key_arg else "0ULL"
        flags[f"P{i}_DIM1"], flags[f"P{i}_DIM2"] = str(dims[0]), str(dims[1])
        flags[f"P{i}_METRIC"] = "1" if pair.metric else "0"
        flags[f"P{i}_SPAN"] = "1" if pair.span else "0"
        flags[f"P{i}_MIN_NS"] = f"{int(pair.min_duration_ms * 1e6)}ULL"
        return [f"-D{k}={v}" for k, v in flags.items()]

    # --- what ----------------------------------------------------------------------------
    def _resource_mode(self, pair: Pair) -> str:
        """`resource:` of the catalog file the pair comes from."""
        return next((s.resource for s in self.catalog.sets if any(p is pair for p in s.pairs)), "process")

    def _pair(self, number: int) -> Pair | None:
        pairs = self.pairs
        return pairs[number] if 0 <= number < len(pairs) else None

    def hist_series(self, dim: int) -> tuple[str, dict[str, object]]:
        pair = self._pair(dim >> 48)
        if pair is None or not pair.metric:
            return self.duration_metric, {"otel_ebpf.usdt.pair": str(dim >> 48)}
        values = ((dim >> 24) & 0xFFFFFF, dim & 0xFFFFFF)
        attrs: dict[str, object] = {}
        for n, name in enumerate(pair.metric_attributes):
            spec = next(a for a in pair.attributes if a.name == name)
            attrs[name] = spec.value(values[n])
        return pair.metric, attrs

    def cache_sizes(self) -> dict[str, int]:
        return {"usdt_parents": len(self._parents)}

    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        out = []
        offset = ctx.mono_to_epoch_ns
        for raw in records:
            if len(raw) < RECORD.size:
                self.malformed_records += 1
                continue
            fields = RECORD.unpack_from(raw)
            start, end, pid, tid, index, resource_pid = fields[:6]
            args = fields[6:6 + MAX_SLOTS]
            str_len = fields[6 + MAX_SLOTS:6 + MAX_SLOTS + MAX_STRINGS]
            blob = fields[-1]
            pair = self._pair(index)
            if pair is None:
                self.malformed_records += 1
                continue
            attrs: dict[str, object] = {THREAD.THREAD_ID: tid}
            for a in pair.attributes:
                if a.type == "string":
                    n = min(str_len[a.slot], STR_MAX)
                    attrs[a.name] = blob[a.slot * STR_MAX:a.slot * STR_MAX + n].decode("utf-8", "replace")
                else:
                    attrs[a.name] = a.value(_signed(args[a.slot]))
            name = span_name(pair.span_name, attrs) if pair.span_name else pair.name
            out.append(SpanData(name, pair.span_kind, start + offset, end + offset, attrs,
                                resource_pid=resource_pid or self._resource_pid(pid, pair), target=self.name))
        return out

    def _resource_pid(self, pid: int, pair: Pair) -> int:
        """A pair of a `resource: parent` file: a child's spans go to its parent running the
        same executable (a PostgreSQL backend's postmaster)."""
        if self._resource_mode(pair) != "parent":
            return pid
        now = time.monotonic()
        cached = self._parents.get(pid)
        if cached is not None and now - cached[1] < 10.0:
            return cached[0]
        result = pid
        info = process.proc_info(pid)
        if info is not None and info.ppid > 1:
            parent = process.proc_info(info.ppid)
            if parent is not None and parent.exe and parent.exe == info.exe:
                result = parent.pid
        if len(self._parents) > 4096:
            self._parents.clear()
        self._parents[pid] = (result, now)
        return result


def _signed(value: int) -> int:
    """Arguments come as u64: a negative int argument (sign-extended) reads back negative."""
    return value - (1 << 64) if value >= 1 << 63 else value
