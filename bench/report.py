"""Results: tables (Markdown), PASS/MISS checks, the runs of a throughput case, and the
interleaved order the throughput benchmarks run their cases in."""
from __future__ import annotations

from dataclasses import dataclass, field

from .stats import NAN, at_most_times, isnan, median, ratio, spread, within


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

    def row(self) -> str:
        return f"| {cell(f'{self.name}: {self.target}')} | {cell(self.measured)} | **{self.verdict}** |"


def cell(value: object) -> str:
    """A table cell's text: a "|" inside would end the cell."""
    return str(value).replace("|", "\\|")


def checks_table(checks: list[Check], title: str | None = None) -> str:
    lines = ([f"### {title}", ""] if title else []) + ["| target | measured | verdict |", "| --- | --- | --- |"]
    return "\n".join(lines + [c.row() for c in checks])


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
            n = len(self.headers)
            rows = [[cell(c) for c in r] + [""] * (n - len(r)) for r in self.rows]
            widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(self.headers)]
            line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
            out.append(line(self.headers))
            out.append("| " + " | ".join("-" * w for w in widths) + " |")
            out += [line(r) for r in rows]
        if self.checks:
            out += ["", checks_table(self.checks)]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def fmt_rate(x: float) -> str:
    return "-" if isnan(x) else f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return "-" if isnan(x) else f"{x:.3f}"


def fmt_num(x: float, digits: int = 1) -> str:
    return "-" if isnan(x) else f"{x:,.{digits}f}"


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
    bpf_ns: list[float] = field(default_factory=list)  # the tool's BPF programs' run time per operation
    bpf_runs: list[float] = field(default_factory=list)  # its program runs per operation
    bpf_detail: str = ""  # per program, of the last run
    us_per_span: list[float] = field(default_factory=list)  # the agent's CPU per span it exported

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

    def add_bpf(self, ns_per_op: float, runs_per_op: float, detail: str) -> None:
        self.bpf_ns.append(ns_per_op)
        self.bpf_runs.append(runs_per_op)
        self.bpf_detail = detail

    @property
    def median_rate(self) -> float:
        return median(self.rates)


def run_interleaved(cases: list, repeats: int, run_one, label: str, unit: str, log=print) -> dict:
    """Run every case `repeats` times, interleaved, the order rotated each repeat (drift hits all alike)."""
    runs = {c: CaseRuns(case_label(c)) for c in cases}
    for r in range(repeats):
        for case in rotated(cases, r):
            run_one(case, runs[case])
            log(f"{label}: repeat {r + 1}/{repeats} {case_label(case)}: "
                f"{fmt_rate(runs[case].rates[-1]) if runs[case].rates else 'failed'} {unit}")
    return runs


def case_label(case) -> str:
    """A case as a log line names it: a tuple key such as ("simple", "bpftrace") as "simple / bpftrace"."""
    return " / ".join(map(str, case)) if isinstance(case, tuple) else str(case)


def rotated(cases: list, r: int) -> list:
    """The order of repeat `r`: the cases rotated left by r."""
    k = r % len(cases) if cases else 0
    return list(cases[k:]) + list(cases[:k])


THROUGHPUT_HEADERS = ["case", "{unit} per run", "median {unit}", "spread", "ratio to no probes",
                      "server CPU µs/{op}", "tool CPU (cores)", "BPF ns/{op}", "BPF runs/{op}",
                      "tool CPU µs/kept span"]


def throughput_headers(unit: str, op: str) -> list[str]:
    return [h.format(unit=unit, op=op) for h in THROUGHPUT_HEADERS]


def throughput_rows(table: Table, runs: dict, target: str, per_operation: str,
                    names: dict | None = None) -> dict:
    """One row per case (runs, median, spread, ratio to no probes, CPU, BPF time), notes; the
    ratios by case. `names`: case -> the row's name (default: str(case)); the baseline is the
    case named "no probes"."""
    cases = list(runs)
    name = (lambda c: names.get(c, str(c))) if names else str  # noqa: E731
    base_case = next(c for c in cases if name(c) == "no probes")
    base = median(runs[base_case].rates)
    ratios = {}
    for case in cases:
        cr = runs[case]
        ratios[case] = ratio(median(cr.rates), base) if cr.rates else NAN
        per_run = " / ".join(fmt_rate(x) + ("*" if c else "") for x, c in zip(cr.rates, cr.company))
        table.rows.append([name(case), per_run or "-", fmt_rate(median(cr.rates)), spread(cr.rates),
                           fmt_ratio(ratios[case]), fmt_num(median(cr.cpu_us)),
                           fmt_num(median(cr.tool_cores), 2) if cr.tool_cores else "-",
                           fmt_num(median(cr.bpf_ns), 0) if cr.bpf_ns else "-",
                           fmt_num(median(cr.bpf_runs), 2) if cr.bpf_runs else "-",
                           fmt_num(median(cr.us_per_span)) if cr.us_per_span else "-"])
    cpu_base = median(runs[base_case].cpu_us)
    for case in cases:
        if case != base_case and runs[case].cpu_us and not isnan(cpu_base) and cpu_base:
            table.notes.append(f"{name(case)}: {per_operation} {median(runs[case].cpu_us) / cpu_base:.3f}× "
                               "the no-probe run's")
    for case in cases:
        if runs[case].bpf_detail:
            table.notes.append(f"{name(case)}: BPF programs per run and runs per operation (last run): "
                               f"{runs[case].bpf_detail}")
    company = sorted(set().union(*(runs[c].company_cmds for c in cases)))
    if company:
        table.notes.append(f"* another eBPF tool that may probe {target} was running at the start or the end of "
                           f"that run (a shared machine): {'; '.join(c[:90] for c in company[:3])}"
                           + (f" and {len(company) - 3} more" if len(company) > 3 else ""))
    for case in cases:
        for note in dict.fromkeys(runs[case].notes):
            table.notes.append(f"{name(case)}: {note}")
    return ratios


def floor_checks(table: Table, ratios: dict, labels: dict, expected: str, margin: float = 0.01,
                 floor: str = "bpftrace") -> None:
    """A check per agent case (`labels`: case -> check label): its ratio at least the floor's − margin."""
    b = ratios.get(floor, NAN)
    for case, label in labels.items():
        if case in ratios:
            a = ratios[case]
            table.checks.append(Check(label, f"{fmt_ratio(a)} ({floor} {fmt_ratio(b)})", expected,
                                      within(a, b, margin)))


def bpf_time_check(label: str, agent_ns: float, tool_ns: float, tool: str, factor: float = 1.5) -> Check:
    """The agent's BPF run time per operation at most `factor` × the other tool's."""
    measured = (f"{fmt_num(agent_ns, 0)} ns against {fmt_num(tool_ns, 0)} ns ({tool}): "
                f"{fmt_num(ratio(agent_ns, tool_ns), 2)}×")
    return Check(label, measured, f"≤ {factor:g}× {tool}", at_most_times(agent_ns, tool_ns, factor))


def bpf_note(stats) -> str:
    """What the BPF columns of a throughput table mean, and how statistics were turned on (bpfstats.BpfStats)."""
    if not stats.enabled:
        return f"BPF run time not measured: statistics could not be turned on ({stats.how})"
    return (f"BPF ns/op: the run time of the tool's own BPF programs (bpf_prog_info run_time_ns / the load's "
            f"operations; statistics on through {stats.how} for the whole table, every case alike), runs/op: their "
            "program runs per operation; tool CPU µs/kept span: the agent process's CPU from the load's start until "
            "its queue was drained, over the spans it exported")
