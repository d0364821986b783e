"""bench/bpfstats.py and the bpftrace scripts the benchmarks write (pure, no root)."""
from __future__ import annotations

import ctypes as ct

from bench.bpfstats import BpfProgInfo, ProgStat, describe, parse_fdinfo, per_operation, usage
from bench.mariadb_stmt import bpftrace_script as mysql_script
from bench.pg import bpftrace_script as pg_script
from bench.tools import ProbePoint


def test_prog_info_layout_matches_linux_bpf_h():
    # struct bpf_prog_info: name at 64, run_time_ns at 192, run_cnt at 200 (x86_64 and arm64)
    assert BpfProgInfo.name.offset == 64
    assert BpfProgInfo.run_time_ns.offset == 192
    assert BpfProgInfo.run_cnt.offset == 200
    assert ct.sizeof(BpfProgInfo) == 208


def test_fdinfo_fields():
    text = ("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t2\nprog_jited:\t1\n"
            "prog_tag:\t3b185187f1855c4c\nmemlock:\t4096\nprog_id:\t2985\nrun_time_ns:\t601\nrun_cnt:\t1\n")
    assert parse_fdinfo(text) == {"prog_tag": "3b185187f1855c4c", "prog_id": "2985", "run_time_ns": "601",
                                  "run_cnt": "1"}


def test_usage_is_the_difference_per_program_and_names_duplicates():
    before = {1: ProgStat(1, "on_query_done", 1000, 10), 2: ProgStat(2, "getppid", 0, 0)}
    after = {1: ProgStat(1, "on_query_done", 4000, 20), 2: ProgStat(2, "getppid", 500, 5),
             3: ProgStat(3, "getppid", 900, 5), 4: ProgStat(4, "idle", 0, 0)}
    progs = usage(before, after)
    assert [(p.name, p.run_time_ns, p.run_cnt) for p in progs] == [
        ("on_query_done", 3000, 10), ("getppid#2", 900, 5), ("getppid", 500, 5)]
    ns, runs = per_operation(progs, 10)
    assert ns == 440.0 and runs == 2.0
    assert describe(progs[:1], 10) == "on_query_done 0.30 µs × 1.00"


def pg_points() -> list[ProbePoint]:
    return [ProbePoint("usdt", f"postgresql:{n}", f"postgresql:{n}", f"on_{n}")
            for n in ("query__start", "query__done", "transaction__abort", "query__execute__start",
                      "query__execute__done")] + [ProbePoint("uprobe", "errcode", "errcode()", "on_errcode")]


def test_pg_bpftrace_script_attaches_every_agent_point():
    script = pg_script("/pg", pg_points())
    lines = script.splitlines()
    assert len(lines) == 6
    assert lines[0] == "usdt:/pg:postgresql:query__start { @qs[tid] = nsecs; }"
    assert lines[1].startswith("usdt:/pg:postgresql:query__done /@qs[tid]/ { @query_us = hist(")
    assert lines[2] == "usdt:/pg:postgresql:transaction__abort { @other = count(); }"
    assert lines[4].startswith("usdt:/pg:postgresql:query__execute__done /@es[tid]/")
    assert lines[5] == "uprobe:/pg:errcode { @other = count(); }"


def test_mysql_bpftrace_script_times_dispatch_command():
    d = "_Z16dispatch_command19enum_server_commandP3THDPcjb"
    points = [ProbePoint("uprobe", d, "dispatch_command()", "on_dispatch_enter"),
              ProbePoint("uretprobe", d, "dispatch_command() return", "on_dispatch_return"),
              ProbePoint("uprobe", "_ZN18Prepared_statement12execute_loopEP6StringbPhS2_", "x", "on_stmt_execute"),
              ProbePoint("uprobe", "_ZN3THD6set_dbEPK25st_mysql_const_lex_string", "THD::set_db()", "on_set_db")]
    lines = mysql_script("/m", points).splitlines()
    assert lines[0] == f"uprobe:/m:{d} {{ @ds[tid] = nsecs; }}"
    assert lines[1].startswith(f"uretprobe:/m:{d} /@ds[tid]/ {{ @us = hist(")
    assert lines[2].endswith("{ @x = count(); }") and lines[3].endswith("{ @other = count(); }")
