"""The mysql target without the kernel: which way in a binary gets (Debian's mariadbd and
a USDT test program built here), the probe plan, histogram keys and record decoding."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from otel_ebpf.config import Config
from otel_ebpf.elf import ElfError, elf_info
from otel_ebpf.targets import registry
from otel_ebpf.targets.base import DecodeContext
from otel_ebpf.targets.mysql import (
    ERROR_UNKNOWN, FLAG_FAILED, FLAG_MARIADB, FLAG_PREPARE, FLAG_PREPARED, FLAG_TEXT_READY, FLAG_USDT, RECORD, MysqlTarget,
    dispatch_layout, server_flavor,
)
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
MARIADBD = "/usr/sbin/mariadbd"
MARIADB_DISPATCH = "_Z16dispatch_command19enum_server_commandP3THDPcjb"
EPOCH = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def mariadbd() -> str:
    require(os.path.exists(MARIADBD), f"{MARIADBD} is missing: apt-get install mariadb-server")
    return MARIADBD


@pytest.fixture(scope="module")
def usdt_program(tmp_path_factory) -> str:
    gcc = shutil.which("gcc")
    require(gcc is not None, "gcc is not installed")
    require(any(os.path.exists(p) for p in ("/usr/include/sys/sdt.h", "/usr/include/x86_64-linux-gnu/sys/sdt.h")),
            "sys/sdt.h is missing: apt-get install systemtap-sdt-dev")
    out = tmp_path_factory.mktemp("mysql-usdt") / "mysql_usdt_test"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-o", str(out), str(REPO / "usdt/mysql_usdt_test.c")],
                   check=True, capture_output=True)
    return str(out)


def test_registered_under_its_name_with_the_kernel_conventions():
    target = registry.create("mysql")
    assert isinstance(target, MysqlTarget)
    assert target.kernel_histograms and target.inflight_keyed_by_tid
    assert target.duration_metric == "db.server.operation.duration"


# --- which way in --------------------------------------------------------------------


def test_mariadbd_gets_uprobes_on_dispatch_command(mariadbd):
    target = MysqlTarget()
    ins = target.inspect(mariadbd)
    assert ins.usable and ins.mechanism == "uprobe"
    assert ins.probes == {"mysql:query__start": False, "mysql:query__done": False, "dispatch_command()": True,
                          "error function": True, "THD::set_db()/reset_db()": True,
                          "Prepared_statement::prepare()": True, "Prepared_statement::execute_loop()": True}
    assert ins.protocols == {"text protocol (COM_QUERY)": True, "prepared statements (COM_STMT_EXECUTE)": True}
    text = "\n".join(ins.notes)
    assert re.search(r"MariaDB 10\.\d+\.\d+ \(db\.system\.name=mariadb\)", text)
    assert "no mysql USDT probes (built without DTrace)" in text
    assert "(command, THD *, packet, length)" in text
    assert "Protocol::net_send_error_packet()" in text

    plan = target.plan(mariadbd, Config(query_max_bytes=2048))
    assert {"-DQUERY_MAX=2048", "-DDB_SYSTEM_MARIADB=1", "-DDISPATCH_LAYOUT=1", "-DTRACK_INIT_DB=0"} <= set(plan.cflags)
    assert not [f for f in plan.cflags if f.startswith("-DARG_")]
    info = elf_info(mariadbd)
    dispatch = info.symbol(MARIADB_DISPATCH)
    specs = {(a.fn_name, a.label): a for a in plan.attach}
    entry = specs[("on_dispatch_enter", "dispatch_command()")]
    ret = specs[("on_dispatch_return", "dispatch_command() return")]
    assert entry.offset == ret.offset == dispatch.file_offset and ret.retprobe and not entry.retprobe
    sent = specs[("on_error_sent", "Protocol::net_send_error_packet()")]
    assert sent.offset == info.symbol("_ZN8Protocol21net_send_error_packetEP3THDjPKcS3_").file_offset
    assert {label for fn, label in specs if fn == "on_set_db"} == {"THD::set_db()", "THD::reset_db()"}
    prepare = specs[("on_stmt_prepare", "Prepared_statement::prepare()")]
    assert prepare.offset == info.symbol("_ZN18Prepared_statement7prepareEPKcj").file_offset
    executes = {a.offset for a in plan.attach if a.fn_name == "on_stmt_execute"}
    assert executes == {info.symbol(n).file_offset for n in (
        "_ZN18Prepared_statement12execute_loopEP6StringbPhS2_",
        "_ZN18Prepared_statement17execute_bulk_loopEP6StringbPhS2_")}
    assert len(plan.attach) == 8, ("two points per query, one per failure, two per database change, "
                                   "one per prepare, one per prepared execute (plain or bulk)")
    assert all(a.ref_ctr_offset == 0 for a in plan.attach)


def test_usdt_program_gets_usdt_with_semaphores(usdt_program):
    target = MysqlTarget()
    ins = target.inspect(usdt_program)
    assert ins.usable and ins.mechanism == "usdt"
    assert ins.probes["mysql:query__start"] and ins.probes["mysql:query__done"]
    assert not ins.probes["dispatch_command()"]
    assert "MySQL (db.system.name=mysql)" in ins.notes[0]
    assert any("my_message_sql()" in n and "query__done's status" in n for n in ins.notes)

    plan = target.plan(usdt_program, Config())
    info = elf_info(usdt_program)
    start, = info.usdt("mysql", "query__start")
    done, = info.usdt("mysql", "query__done")
    by_fn = {a.fn_name: a for a in plan.attach}
    assert set(by_fn) == {"on_usdt_query_start", "on_usdt_query_done", "on_error_raised"}
    assert (by_fn["on_usdt_query_start"].offset, by_fn["on_usdt_query_start"].ref_ctr_offset) == \
        (start.file_offset, start.semaphore_offset)
    assert (by_fn["on_usdt_query_done"].offset, by_fn["on_usdt_query_done"].ref_ctr_offset) == \
        (done.file_offset, done.semaphore_offset)
    assert start.semaphore_offset and done.semaphore_offset, "a semaphore per probe, as dtrace -G builds"
    assert by_fn["on_error_raised"].offset == info.symbol("my_message_sql").file_offset
    flags = dict(f[2:].split("=", 1) for f in plan.cflags)
    assert flags["DB_SYSTEM_MARIADB"] == "0" and flags["ERROR_IGNORE_FLAGS"] == "0"
    for name, probe, index in (("ARG_QUERY", "query__start", 1), ("ARG_CONNID", "query__start", 2),
                               ("ARG_DB", "query__start", 3), ("ARG_STATUS", "query__done", 1)):
        assert flags[name] == info.usdt_arg_macro("mysql", probe, index)
    assert "s32" in flags["ARG_STATUS"], "query__done's status is a signed int"


@pytest.mark.parametrize("path", ["/bin/true", "/nonexistent/mysqld", __file__])
def test_unusable_binaries_are_explained_not_raised(path):
    target = MysqlTarget()
    ins = target.inspect(path)
    assert not ins.usable and ins.notes
    with pytest.raises(ElfError, match=re.escape(path)):
        target.plan(path, Config())


def test_vanished_binary(usdt_program, tmp_path):
    copy = tmp_path / "mysqld"
    shutil.copy(usdt_program, copy)
    target = MysqlTarget()
    assert target.inspect(str(copy)).usable
    copy.unlink()
    assert not target.inspect(str(copy)).usable
    with pytest.raises(ElfError, match="No such file"):
        target.plan(str(copy), Config())


@pytest.mark.parametrize("name, layout", [
    (MARIADB_DISPATCH, "command_first"),                                          # MariaDB 10.6+
    ("_Z16dispatch_command19enum_server_commandP3THDPcjbb", "command_first"),     # MariaDB 10.2-10.5
    ("_Z16dispatch_command19enum_server_commandP3THDPcj", "command_first"),       # MySQL 5.6
    ("_Z16dispatch_commandP3THDPK8COM_DATA19enum_server_command", "com_data"),    # MySQL 5.7 / 8
    ("_Z16dispatch_command19enum_server_commandP3THDPcjbbb", "command_first"),   # a future flag
    ("_Z16dispatch_commandP3THDPKc", ""),
    ("dispatch_command", ""),
])
def test_dispatch_layout_from_the_mangled_signature(name, layout):
    assert dispatch_layout(name) == layout


def test_server_flavor(mariadbd, usdt_program):
    system, version = server_flavor(mariadbd)
    assert system == "mariadb" and re.fullmatch(r"10\.\d+\.\d+", version)
    assert server_flavor(usdt_program) == ("mysql", "")


# --- kernel histograms ---------------------------------------------------------------


def dim(operation: int, error: int = 0, mariadb: bool = True) -> int:
    return (int(mariadb) << 40) | (error << 8) | operation


def test_hist_attributes():
    t = MysqlTarget()
    assert t.hist_attributes(dim(1)) == {"db.system.name": "mariadb", "db.operation.name": "SELECT"}
    assert t.hist_attributes(dim(2, 1062)) == {"db.system.name": "mariadb", "db.operation.name": "INSERT",
                                               "error.type": "1062"}
    assert t.hist_attributes(dim(0, 1064, mariadb=False)) == {
        "db.system.name": "mysql", "db.operation.name": "_OTHER", "error.type": "1064"}
    assert t.hist_attributes(dim(4, ERROR_UNKNOWN))["error.type"] == "_OTHER"
    assert t.hist_attributes(dim(200))["db.operation.name"] == "_OTHER"


def test_header_mirrors_python_constants():
    source = (REPO / "probes/mysql.h").read_text()
    defines = dict(re.findall(r"#define (FLAG_\w+|DB_MAX) (\w+)", source))
    assert {k: int(v, 0) for k, v in defines.items()} == {
        "FLAG_MARIADB": FLAG_MARIADB, "FLAG_USDT": FLAG_USDT, "FLAG_FAILED": FLAG_FAILED,
        "FLAG_PREPARED": FLAG_PREPARED, "FLAG_PREPARE": FLAG_PREPARE, "FLAG_TEXT_READY": FLAG_TEXT_READY,
        "DB_MAX": 64}
    assert re.search(r"#define ERROR_UNKNOWN (\w+)", (REPO / "probes/mysql.c").read_text()).group(1).lower() == hex(ERROR_UNKNOWN)


# --- decoding ------------------------------------------------------------------------


def record(query: bytes, *, db: bytes = b"shop", flags: int = FLAG_MARIADB, error: int = 0, pid: int = 4242,
           start: int = 1_000_000, end: int = 3_000_000) -> bytes:
    return RECORD.struct.pack(start, end, 0, 0, pid, pid + 1, error, flags, len(query), len(query), 0, 0, db) + query


def decode(*raws: bytes, **config) -> list:
    ctx = DecodeContext(EPOCH, dataclasses.replace(Config(), **config))
    return list(MysqlTarget().decode(list(raws), ctx))


def test_decode_a_query():
    (span,) = decode(record(b"SELECT name FROM `items` WHERE id = 42 AND note = \"secret\" # trailing"))
    assert span.name == "SELECT items" and span.kind == 2 and not span.error
    assert span.attributes == {
        "db.system.name": "mariadb", "db.namespace": "shop",
        "db.query.text": "SELECT name FROM `items` WHERE id = ? AND note = ?",
        "db.query.summary": "SELECT items", "db.operation.name": "SELECT"}
    assert (span.start_ns, span.end_ns) == (EPOCH + 1_000_000, EPOCH + 3_000_000)
    assert span.resource_pid == 4242 and span.target == "mysql"


def test_decode_failures():
    failed, unknown, swallowed = decode(
        record(b"INSERT INTO t VALUES (1)", error=1062, flags=FLAG_MARIADB | FLAG_FAILED),
        record(b"DELETE FROM t", flags=FLAG_USDT | FLAG_FAILED),
        record(b"SELECT 1", error=1146, flags=FLAG_USDT))  # a number but no failure: never exported
    assert failed.error and failed.status_message == "MariaDB error 1062"
    assert failed.attributes["db.response.status_code"] == "1062" and failed.attributes["error.type"] == "1062"
    assert unknown.error and unknown.attributes["error.type"] == "_OTHER"
    assert "db.response.status_code" not in unknown.attributes
    assert unknown.attributes["db.system.name"] == "mysql" and unknown.status_message == "MySQL error unknown"
    assert not swallowed.error and "error.type" not in swallowed.attributes


def test_decode_bad_input_is_counted_not_raised():
    target = MysqlTarget()
    ctx = DecodeContext(EPOCH, Config())
    good = record(b"SELECT 'caf\xc3\xa9' \xff\xfe FROM t", db=b"caf\xff")
    cut = record(b"SELECT 1")[: RECORD.size - 10]
    overlong = RECORD.struct.pack(0, 1, 0, 0, 1, 1, 0, FLAG_MARIADB, 5000, 5000, 0, 0, b"") + b"SELECT 'secret"
    spans = list(target.decode([good, cut, b"", overlong], ctx))
    assert target.malformed_records == 2
    assert [s.attributes["db.query.text"] for s in spans] == ["SELECT ? \ufffd\ufffd FROM t", "SELECT ?"]
    assert spans[0].attributes["db.namespace"] == "caf\ufffd"


def test_decode_multi_statement_packet_is_one_span():
    (span,) = decode(record(b"SELECT 1; SELECT * FROM no_such_table; SELECT 3", error=1146,
                            flags=FLAG_MARIADB | FLAG_FAILED))
    assert span.attributes["db.query.text"] == "SELECT ?; SELECT * FROM no_such_table; SELECT ?"
    assert span.name == "SELECT" and span.attributes["error.type"] == "1146"


def test_decode_without_database_and_raw_capture():
    (span,) = decode(record(b"SHOW TABLES", db=b""))
    assert "db.namespace" not in span.attributes
    (raw,) = decode(record(b"SELECT 'kept'"), capture_raw_query=True)
    assert raw.attributes["db.query.text"] == "SELECT 'kept'"
