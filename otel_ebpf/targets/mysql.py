"""MySQL and MariaDB: one SERVER span per query, by USDT where the build has it,
else by uprobes on dispatch_command.

See probes/mysql.c for the kernel side, usdt/mysql.yaml for the symbols and probes
this module looks for, and docs/mysql.md for what each path can and cannot tell.
Choosing the path is `examine()`: both `inspect()` (doctor, list) and `plan()`
(the agent) go through it, so they never disagree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from opentelemetry.semconv.attributes import db_attributes as DB
from opentelemetry.semconv.attributes import error_attributes as ERROR

from ..contract import layout, sql_operation_name
from ..elf import ElfError, ElfInfo, Symbol, UsdtProbe, elf_info
from . import common
from .base import (
    KIND_SERVER, AttachSpec, BuildPlan, DecodeContext, Inspection, SpanData, Target,
)

if TYPE_CHECKING:
    from ..config import Config

PROVIDER = "mysql"
USDT_START, USDT_DONE = "query__start", "query__done"
MECHANISM_USDT, MECHANISM_UPROBE = "usdt", "uprobe"
SYSTEM_MARIADB, SYSTEM_MYSQL = "mariadb", "mysql"
LAYOUTS = {"command_first": 1, "com_data": 2}  # -DDISPATCH_LAYOUT
LAYOUT_TEXT = {
    "command_first": "(command, THD *, packet, length): MariaDB 10.x / MySQL <= 5.6",
    "com_data": "(THD *, const COM_DATA *, command): MySQL 5.7 / 8",
}
# Concurrent queries the kernel can follow (each holds a copy of its query text).
INFLIGHT_MAX = 4096

# Record flags (probes/mysql.h) and the dim layout (probes/mysql.c).
FLAG_MARIADB, FLAG_USDT, FLAG_FAILED, FLAG_PREPARED, FLAG_PREPARE = 1, 2, 4, 8, 16
FLAG_TEXT_READY = 32  # the kernel's own bookkeeping
ERROR_UNKNOWN = 0xFFFFFF
OTHER = "_OTHER"
TAIL_MAX = 256  # bytes of a long query's end the kernel copies (probes/mysql.h)

RECORD = layout("mysql.h", "mysql_event", [
    ("start_ns", "Q"), ("end_ns", "Q"), ("connection_id", "Q"), ("stmt", "Q"), ("pid", "I"), ("tid", "I"),
    ("error_code", "I"), ("flags", "I"), ("query_len", "I"), ("copied", "I"), ("tail_len", "I"),
    ("operation", "I"), ("db", "64s"),
], tail="query")

_MARIADB_VERSION_RE = rb"(\d+\.\d+\.\d+)-MariaDB"


def catalog() -> dict:
    return common.catalog("mysql.yaml")


@dataclass(frozen=True)
class ErrorProbe:
    symbol: Symbol
    label: str
    kind: str  # "sent": the client got an error packet; "raised": my_message_sql
    ignore_flags: int


@dataclass
class MysqlBinary:
    """What one binary offers the mysql target, and which way in it gets."""

    path: str
    system: str  # mariadb | mysql
    version: str
    usdt_start: list[UsdtProbe]
    usdt_done: list[UsdtProbe]
    dispatch: Symbol | None
    layout: str  # key of LAYOUTS, "" when dispatch_command's signature is unknown
    error: ErrorProbe | None
    db_symbols: list[tuple[Symbol, str]]  # with their labels
    prepare: tuple[Symbol, int, int] | None = None  # Prepared_statement::prepare, text and length args
    execute: list[Symbol] = field(default_factory=list)  # Prepared_statement::execute_loop and kin
    notes: list[str] = field(default_factory=list)
    unusable_reason: str = ""

    @property
    def has_usdt(self) -> bool:
        return bool(self.usdt_start and self.usdt_done)

    @property
    def prepared_statements(self) -> bool:
        """COM_STMT_EXECUTE is traced: prepare/execute symbols and a known dispatch_command."""
        return self.prepare is not None and bool(self.execute) and self.dispatch is not None

    @property
    def mechanism(self) -> str:
        if self.has_usdt:
            return MECHANISM_USDT
        return MECHANISM_UPROBE if self.dispatch is not None and self.layout else ""


# --- what the binary is ------------------------------------------------------------


def server_flavor(path: str) -> tuple[str, str]:
    """("mariadb" | "mysql", version) from the binary's own bytes: MariaDB's version
    string always carries "-MariaDB"; anything else is taken for MySQL."""
    groups = common.search_binary(path, _MARIADB_VERSION_RE)
    # MySQL's version has no marker that tells it from other numbers in the binary.
    if groups:
        return SYSTEM_MARIADB, groups[0].decode()
    return (SYSTEM_MARIADB if os.path.basename(path) == "mariadbd" else SYSTEM_MYSQL), ""


def dispatch_layout(symbol_name: str) -> str:
    """Argument layout of a dispatch_command, from its mangled name ("" if unknown)."""
    for entry in catalog()["dispatch_command"]:
        if entry["symbol"] == symbol_name:
            return entry["layout"]
    if symbol_name.startswith("_Z16dispatch_command19enum_server_commandP3THDPc"):
        return "command_first"  # same first four arguments, more flags after them
    if symbol_name.startswith("_Z16dispatch_commandP3THDPK8COM_DATA19enum_server_command"):
        return "com_data"
    return ""


def _find_dispatch(info: ElfInfo) -> tuple[Symbol | None, str, list[str]]:
    """(symbol, layout, names seen): the known signature first, then any dispatch_command."""
    for entry in catalog()["dispatch_command"]:
        sym = info.symbol(entry["symbol"])
        if sym is not None and sym.file_offset >= 0:
            return sym, entry["layout"], [sym.name]
    seen = info.symbols_matching(r"_Z16dispatch_command.*|dispatch_command")
    for sym in seen:
        layout = dispatch_layout(sym.name)
        if layout and sym.file_offset >= 0:
            return sym, layout, [s.name for s in seen]
    return (seen[0] if seen else None), "", [s.name for s in seen]


def _find_error_probe(info: ElfInfo, system: str) -> ErrorProbe | None:
    for entry in catalog()["errors"]:
        sym = info.symbol(entry["symbol"])
        if sym is None or sym.file_offset < 0:
            continue
        ignore = entry.get("ignore_flags", {})
        return ErrorProbe(sym, entry["label"], entry["kind"], int(ignore.get(system, 0)))
    return None


def _find_prepared(info: ElfInfo) -> tuple[tuple[Symbol, int, int] | None, list[Symbol]]:
    entries = catalog().get("prepared_statements", {})
    prepare = None
    for entry in entries.get("prepare", []):
        sym = info.symbol(entry["symbol"])
        if sym is not None and sym.file_offset >= 0:
            prepare = (sym, int(entry["text"]), int(entry["length"]))
            break
    execute = [sym for name in entries.get("execute", [])
               if (sym := info.symbol(name)) is not None and sym.file_offset >= 0]
    return prepare, execute


def examine(path: str) -> MysqlBinary:
    """Everything the mysql target needs from a binary; raises ElfError if unreadable."""
    info = elf_info(path)
    system, version = server_flavor(path)
    dispatch, layout, dispatch_names = _find_dispatch(info)
    db_symbols = [(s, entry["label"]) for entry in catalog()["current_db"]
                  if (s := info.symbol(entry["symbol"])) and s.file_offset >= 0]
    binary = MysqlBinary(
        path=path, system=system, version=version,
        usdt_start=info.usdt(PROVIDER, USDT_START), usdt_done=info.usdt(PROVIDER, USDT_DONE),
        dispatch=dispatch if layout else None, layout=layout,
        error=_find_error_probe(info, system),
        db_symbols=db_symbols if len(db_symbols) == len(catalog()["current_db"]) else [],
    )
    binary.prepare, binary.execute = _find_prepared(info)
    if not binary.mechanism:
        found = ", ".join(dispatch_names) if dispatch_names else "no dispatch_command symbol"
        binary.unusable_reason = (
            f"no mysql USDT probes and no known dispatch_command signature ({found}); "
            "a stripped binary needs its debug symbols (e.g. the -dbgsym package) or a DTrace build")
    binary.notes = _explain(binary, info)
    return binary


def _explain(b: MysqlBinary, info: ElfInfo) -> list[str]:
    """Why this way in, and what the spans will and will not carry."""
    if not b.mechanism:
        return [f"cannot attach: {b.unusable_reason}"]
    name = f"{'MariaDB' if b.system == SYSTEM_MARIADB else 'MySQL'}{' ' + b.version if b.version else ''}"
    notes = [f"{name} (db.system.name={b.system})"]
    if b.has_usdt:
        notes.append("USDT: mysql:query__start/query__done present, their semaphores raised by the kernel; "
                     "one span per statement, db.namespace from the probe"
                     + ("; dispatch_command also present, USDT preferred" if b.layout else ""))
    else:
        why = ("no mysql USDT probes (built without DTrace)" if not info.probes
               else "USDT probes present but not the mysql:query__start/query__done pair")
        notes.append(f"{why}: uprobe + uretprobe on dispatch_command {LAYOUT_TEXT[b.layout]}; "
                     "one span per COM_QUERY packet (a multi-statement packet is one span)")
        notes.append("db.namespace: THD::set_db/THD::reset_db (handshake, COM_INIT_DB, USE)" if b.db_symbols
                     else "db.namespace: from COM_INIT_DB only (no THD::set_db/reset_db symbols): "
                          "a USE statement or the handshake's database is not seen")
    if b.prepared_statements:
        notes.append("prepared statements: COM_STMT_EXECUTE is one span with the statement's text "
                     "(Prepared_statement::prepare keeps it; parameters are never read); a COM_STMT_PREPARE "
                     "is a span only when it fails")
    else:
        notes.append("prepared statements (COM_STMT_EXECUTE) are not seen: no Prepared_statement::prepare/"
                     "execute_loop symbols or no known dispatch_command")
    notes.append(_explain_errors(b))
    return notes


def _explain_errors(b: MysqlBinary) -> str:
    if b.error is None:
        return ("no error function: failed queries are marked by query__done's status, without a number"
                if b.has_usdt else "no error function found: failed queries are not seen")
    if b.error.kind == "sent":
        return f"errors: {b.error.label} (the error packet the client receives)"
    if b.has_usdt:
        return f"errors: {b.error.label} (numbers only; query__done's status says whether the query failed)"
    return f"errors: {b.error.label} (also fires for errors a handler swallows, e.g. in a stored procedure)"


# --- the target ------------------------------------------------------------------


class MysqlTarget(Target):
    name = "mysql"
    c_file = "mysql.c"
    duration_metric = "db.server.operation.duration"
    metric_attributes = (DB.DB_SYSTEM_NAME, DB.DB_OPERATION_NAME, ERROR.ERROR_TYPE)
    kernel_histograms = True
    inflight_keyed_by_tid = True  # probes/mysql.c pairs start and end by thread

    def __init__(self) -> None:
        self.malformed_records = 0  # ring buffer records too short to decode

    # --- where -------------------------------------------------------------
    def candidate_paths(self) -> list[str]:
        paths = ("/usr/sbin/mariadbd", "/usr/sbin/mysqld", "/usr/bin/mariadbd", "/usr/bin/mysqld",
                 "/usr/local/mysql/bin/mysqld", "/usr/local/mysql/bin/mariadbd")
        return [p for p in paths if os.path.exists(p)]

    def matches_process(self, comm: str, exe: str) -> bool:
        return os.path.basename(exe) in ("mysqld", "mariadbd")

    def inspect(self, path: str) -> Inspection:
        try:
            b = examine(path)
        except ElfError as exc:
            return Inspection(path, False, "none", {}, [str(exc)])
        probes = {
            f"{PROVIDER}:{USDT_START}": bool(b.usdt_start),
            f"{PROVIDER}:{USDT_DONE}": bool(b.usdt_done),
            "dispatch_command()": b.dispatch is not None,
            "error function": b.error is not None,
            "THD::set_db()/reset_db()": bool(b.db_symbols),
            "Prepared_statement::prepare()": b.prepare is not None,
            "Prepared_statement::execute_loop()": bool(b.execute),
        }
        protocols = {"text protocol (COM_QUERY)": bool(b.mechanism),
                     "prepared statements (COM_STMT_EXECUTE)": b.prepared_statements}
        return Inspection(path, bool(b.mechanism), b.mechanism or "none", probes, b.notes, protocols)

    def plan(self, path: str, config: "Config") -> BuildPlan:
        b = examine(path)
        if not b.mechanism:
            raise ElfError(f"{path}: {b.unusable_reason}")
        cflags = [
            f"-DQUERY_MAX={config.query_max_bytes}", f"-DTAIL_MAX={TAIL_MAX}",
            f"-DINFLIGHT_MAX={INFLIGHT_MAX}",
            f"-DDB_SYSTEM_MARIADB={1 if b.system == SYSTEM_MARIADB else 0}",
            f"-DERROR_IGNORE_FLAGS={b.error.ignore_flags if b.error else 0}",
        ]
        if b.has_usdt:
            attach = self._usdt_attach(b)
            cflags += self._usdt_cflags(path)
            cflags.append("-DDISPATCH_QUERY=0")  # USDT traces COM_QUERY; dispatch_command only COM_STMT_*
            if b.prepared_statements:  # COM_STMT_* and their connection's database
                attach += self._dispatch_attach(b) + self._db_attach(b)
        else:
            attach = self._uprobe_attach(b)
        if b.dispatch is not None:
            cflags += [f"-DDISPATCH_LAYOUT={LAYOUTS[b.layout]}", f"-DTRACK_INIT_DB={0 if b.db_symbols else 1}"]
        if b.prepared_statements:
            assert b.prepare is not None
            symbol, text_arg, length_arg = b.prepare
            attach.append(AttachSpec("on_stmt_prepare", symbol.file_offset, "Prepared_statement::prepare()"))
            attach += [AttachSpec("on_stmt_execute", s.file_offset, "Prepared_statement::execute_loop()")
                       for s in b.execute]
            cflags += [f"-DSTMT_TEXT_ARG=PT_REGS_PARM{text_arg}(ctx)",
                       f"-DSTMT_LENGTH_ARG=PT_REGS_PARM{length_arg}(ctx)"]
        if b.error is not None:
            fn = "on_error_sent" if b.error.kind == "sent" else "on_error_raised"
            attach.append(AttachSpec(fn, b.error.symbol.file_offset, b.error.label))
        return BuildPlan(cflags, attach, list(b.notes))

    @staticmethod
    def _usdt_cflags(path: str) -> list[str]:
        info = elf_info(path)
        return [
            f"-DARG_QUERY={info.usdt_arg_macro(PROVIDER, USDT_START, 1)}",
            f"-DARG_CONNID={info.usdt_arg_macro(PROVIDER, USDT_START, 2)}",
            f"-DARG_DB={info.usdt_arg_macro(PROVIDER, USDT_START, 3)}",
            f"-DARG_STATUS={info.usdt_arg_macro(PROVIDER, USDT_DONE, 1)}",
        ]

    @staticmethod
    def _usdt_attach(b: MysqlBinary) -> list[AttachSpec]:
        return [
            AttachSpec(fn, site.file_offset, f"{PROVIDER}:{site.name}", ref_ctr_offset=site.semaphore_offset)
            for sites, fn in ((b.usdt_start, "on_usdt_query_start"), (b.usdt_done, "on_usdt_query_done"))
            for site in sites
        ]

    @staticmethod
    def _dispatch_attach(b: MysqlBinary) -> list[AttachSpec]:
        assert b.dispatch is not None
        offset = b.dispatch.file_offset
        return [AttachSpec("on_dispatch_enter", offset, "dispatch_command()"),
                AttachSpec("on_dispatch_return", offset, "dispatch_command() return", retprobe=True)]

    @staticmethod
    def _db_attach(b: MysqlBinary) -> list[AttachSpec]:
        return [AttachSpec("on_set_db", sym.file_offset, label) for sym, label in b.db_symbols]

    @classmethod
    def _uprobe_attach(cls, b: MysqlBinary) -> list[AttachSpec]:
        return cls._dispatch_attach(b) + cls._db_attach(b)

    # --- what ----------------------------------------------------------------
    def hist_attributes(self, dim: int) -> dict[str, object]:
        operation = dim & 0xFF
        error = (dim >> 8) & ERROR_UNKNOWN
        attrs: dict[str, object] = {
            DB.DB_SYSTEM_NAME: SYSTEM_MARIADB if (dim >> 40) & 1 else SYSTEM_MYSQL,
            DB.DB_OPERATION_NAME: sql_operation_name(operation),
        }
        if error:
            attrs[ERROR.ERROR_TYPE] = OTHER if error == ERROR_UNKNOWN else str(error)
        return attrs

    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        out: list[SpanData] = []
        for raw in records:
            span = self._span(raw, ctx)
            if span is None:
                self.malformed_records += 1
            else:
                out.append(span)
        return out

    def _span(self, raw: bytes, ctx: DecodeContext) -> SpanData | None:
        if len(raw) < RECORD.size:
            return None
        (start, end, _connection_id, _stmt, pid, _tid, error_code, flags, _query_len, copied, tail_len,
         _operation, db) = RECORD.unpack_from(raw)
        at = RECORD.size
        query = raw[at:at + copied]
        tail_at = at + ctx.config.query_max_bytes
        tail = raw[tail_at:tail_at + tail_len] if tail_len else b""
        system = SYSTEM_MARIADB if flags & FLAG_MARIADB else SYSTEM_MYSQL
        namespace = db.split(b"\0", 1)[0].decode("utf-8", "replace")
        attrs, info, comment = common.query_attributes(system, "mysql", namespace, query, tail, ctx.config)
        failed = bool(flags & FLAG_FAILED)
        message = ""
        if failed:
            if error_code:
                attrs[DB.DB_RESPONSE_STATUS_CODE] = str(error_code)
            attrs[ERROR.ERROR_TYPE] = str(error_code) if error_code else OTHER
            message = f"{'MariaDB' if system == SYSTEM_MARIADB else 'MySQL'} error {error_code or 'unknown'}"
        offset = ctx.mono_to_epoch_ns
        span = SpanData(info.summary or system, KIND_SERVER, start + offset, end + offset, attrs,
                        resource_pid=pid, target=self.name, error=failed, status_message=message)
        common.apply_sql_comment(span, comment)
        return span
