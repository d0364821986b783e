"""bench/report.py: Markdown tables, checks, the interleaved order, throughput rows (pure, no root)."""
from __future__ import annotations

from bench.report import (
    CaseRuns, Check, Table, bpf_time_check, case_label, checks_table, floor_checks, fmt_rate, fmt_ratio, rotated,
    run_interleaved, throughput_headers, throughput_rows,
)

NAN = float("nan")


def test_table_renders_aligned_markdown_with_checks_and_notes():
    t = Table("T", ["case", "rate"], [["no probes", "1,000"], ["agent", "9"]], notes=["a note"],
              checks=[Check("ratio", "0.950 (bpftrace 0.960)", "≥ bpftrace − 0.02", True)])
    text = t.render()
    lines = text.splitlines()
    assert lines[0] == "### T"
    assert lines[2] == "| case      | rate  |"
    assert lines[3] == "| --------- | ----- |"
    assert lines[4] == "| no probes | 1,000 |"
    assert lines[5] == "| agent     | 9     |"
    assert "| ratio: ≥ bpftrace − 0.02 | 0.950 (bpftrace 0.960) | **PASS** |" in lines
    assert lines[-1] == "- a note" and text.endswith("\n")


def test_table_pads_short_rows_and_escapes_pipes():
    text = Table("T", ["a", "b", "c"], [["x"]]).render()
    assert "| x |   |   |" in text
    text = Table("T", ["a"], [["|x|"]], checks=[Check("n", "|m|", "t", True)]).render()
    assert "| \\|x\\| |" in text and "| n: t | \\|m\\| | **PASS** |" in text


def test_check_verdicts():
    assert Check("n", "m", "t", True).verdict == "PASS"
    assert Check("n", "m", "t", False).verdict == "MISS"
    assert Check("n", "m", "t", None).verdict == "n/a"
    assert Check("n", "m", "t", None, "inconclusive").verdict == "inconclusive"
    assert checks_table([Check("n", "m", "t", True)], "Targets").splitlines()[0] == "### Targets"


def test_formatting_of_missing_values():
    assert fmt_rate(NAN) == "-" and fmt_rate(12345.6) == "12,346"
    assert fmt_ratio(NAN) == "-" and fmt_ratio(0.91234) == "0.912"


def test_rotation_and_interleaving_run_every_case_in_turn():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    order = []

    def run_one(case, runs):
        order.append(case)
        runs.rates.append(1.0)

    runs = run_interleaved([("simple", "x"), ("simple", "y")], 2, run_one, "t", "tps", log=lambda m: None)
    assert order == [("simple", "x"), ("simple", "y"), ("simple", "y"), ("simple", "x")]
    assert runs[("simple", "x")].name == "simple / x" == case_label(("simple", "x"))


def runs_of(name: str, rates: list[float], bpf: list[float] = ()) -> CaseRuns:
    cr = CaseRuns(name)
    for r in rates:
        cr.add(r, 1000, 0.01, 0.0, [], None)
    for ns in bpf:
        cr.add_bpf(ns, 4.0, "p 1.00 µs × 4.00")
    return cr


def test_throughput_rows_ratios_checks_and_bpf_columns():
    runs = {"no probes": runs_of("no probes", [100.0, 110.0, 90.0]),
            "bpftrace": runs_of("bpftrace", [90.0, 92.0, 88.0], [1000.0, 1100.0]),
            "agent (defaults)": runs_of("agent (defaults)", [88.5, 87.0, 90.0], [1400.0, 1500.0])}
    table = Table("t", throughput_headers("tps", "txn"))
    ratios = throughput_rows(table, runs, "postgres", "server CPU per transaction")
    assert ratios["bpftrace"] == 0.9 and ratios["agent (defaults)"] == 0.885
    assert table.headers[7] == "BPF ns/txn"
    bpftrace_row = table.rows[1]
    assert bpftrace_row[:5] == ["bpftrace", "90 / 92 / 88", "90", "±2 %", "0.900"]
    assert bpftrace_row[7:9] == ["1,050", "4.00"]
    floor_checks(table, ratios, {"agent (defaults)": "agent"}, "≥ bpftrace − 0.02", margin=0.02)
    floor_checks(table, ratios, {"agent (defaults)": "agent strict"}, "≥ bpftrace − 0.01")
    assert [c.ok for c in table.checks] == [True, False]
    assert any(n.startswith("bpftrace: BPF programs") for n in table.notes)


def test_bpf_time_check():
    c = bpf_time_check("BPF", 1450.0, 1000.0, "bpftrace")
    assert c.ok is True and c.measured == "1,450 ns against 1,000 ns (bpftrace): 1.45×"
    assert bpf_time_check("BPF", 1600.0, 1000.0, "bpftrace").ok is False
    assert bpf_time_check("BPF", NAN, 1000.0, "bpftrace").verdict == "n/a"
