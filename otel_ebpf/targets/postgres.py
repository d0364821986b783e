"""PostgreSQL: one SERVER span per executed statement, from the server's USDT probes.

See probes/postgres.c for the kernel side: simple-protocol queries (query__start/done),
extended-protocol Executes (query__execute__start/done in PortalRun, the outermost one
outside a simple query), and failures in any phase (errstart() at ERROR level, errcode()
and transaction__abort; a failing Parse or Bind message included). Only when errstart()
cannot be probed does the kernel send an abort with no error seen (a ROLLBACK, whose done
follows at once): such records wait here briefly for that done.
"""
from __future__ import annotations

import glob
import os
import re
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable

from opentelemetry.semconv.attributes import db_attributes as DB
from opentelemetry.semconv.attributes import error_attributes as ERROR
from opentelemetry.semconv.attributes import server_attributes as SERVER

from .. import process
from ..contract import layout, sql_operation_name
from ..elf import AARCH64, X86_64, ElfError, ElfInfo, elf_info, instruction_pointer_expr
from . import common
from .base import (
    KIND_SERVER, BuildPlan, DecodeContext, Inspection, ProbePoint, SpanData, Target, require_resolved,
    resolve_probe_points,
)

if TYPE_CHECKING:
    from ..config import Config

PROVIDER = "postgresql"
KIND_DONE, KIND_ABORT, KIND_ABORT_NO_CODE = 1, 2, 3
PROTOCOL_SIMPLE, PROTOCOL_EXTENDED, PROTOCOL_MESSAGE = 1, 2, 3  # pg_event.protocol
# A ROLLBACK's done follows its abort within microseconds; wait this long.
ABORT_HOLD_NS = 500_000_000
TAIL_MAX = 256  # bytes of a long query's end the kernel copies (probes/postgres.h)

PROBE_POINTS = (
    ProbePoint("on_query_start", usdt=f"{PROVIDER}:query__start"),
    ProbePoint("on_query_done", usdt=f"{PROVIDER}:query__done"),
    ProbePoint("on_transaction_abort", usdt=f"{PROVIDER}:transaction__abort"),
    # PortalRun's own sites: exec_execute_message runs one per Execute message. The sites
    # in PortalRunMulti (a static function PortalRun calls) would only add probe hits.
    ProbePoint("on_execute_start", usdt=f"{PROVIDER}:query__execute__start", within="PortalRun", required=False),
    ProbePoint("on_execute_done", usdt=f"{PROVIDER}:query__execute__done", within="PortalRun", required=False),
    # errstart(elevel) tells an error from a notice or warning that also calls errcode();
    # errstart_cold is its twin for constant levels (a jump to errstart, or a copy of it).
    ProbePoint("on_errstart", symbols=("errstart",), required=False),
    ProbePoint("on_errstart_cold", symbols=("errstart_cold",), required=False),
    ProbePoint("on_errcode", symbols=("errcode",), required=False),
)

RECORD = layout("postgres.h", "pg_event", [
    ("start_ns", "Q"), ("end_ns", "Q"), ("pid", "I"), ("postmaster_pid", "I"), ("kind", "I"), ("sqlstate", "I"),
    ("raddr", "28s"), ("laddr", "64s"), ("database", "64s"), ("query_len", "I"), ("protocol", "I"),
    ("tail_len", "I"), ("flags", "I"),
], tail="query")

_VERSION_RE = rb"\(PostgreSQL\) (\d+)(?:\.(\d+))?"
_CMDLINE_DB_RE = re.compile(r"^postgres: (?:[^:]+: )?(\S+) (\S+) ")


def catalog() -> dict:
    return common.catalog("postgresql.yaml")


def jumps_to(path: str, info: ElfInfo, name: str, target: str) -> bool:
    """Whether function `name` is only a jump to `target` (PostgreSQL's errstart_cold is
    `return errstart(...)`, which compilers make a tail jump): probing both would count
    each error twice and compile a function for nothing."""
    sym, dest = info.symbol(name), info.symbol(target)
    if sym is None or dest is None:
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(sym.file_offset)
            code = fh.read(5)
    except OSError:
        return False
    if info.machine == X86_64 and len(code) == 5 and code[0] == 0xE9:  # jmp rel32
        return sym.vaddr + 5 + int.from_bytes(code[1:5], "little", signed=True) == dest.vaddr
    if info.machine == X86_64 and len(code) >= 2 and code[0] == 0xEB:  # jmp rel8
        return sym.vaddr + 2 + int.from_bytes(code[1:2], "little", signed=True) == dest.vaddr
    if info.machine == AARCH64 and len(code) >= 4:
        word = int.from_bytes(code[:4], "little")
        if word >> 26 == 0b000101:  # b imm26
            imm = word & 0x3FFFFFF
            return sym.vaddr + ((imm - (1 << 26) if imm & (1 << 25) else imm) << 2) == dest.vaddr
    return False


def server_major_version(path: str) -> int | None:
    """The major version a postgres binary reports, read from its own bytes."""
    groups = common.search_binary(path, _VERSION_RE)
    return int(groups[0]) if groups else None


def sqlstate_text(code: int) -> str:
    """PostgreSQL packs SQLSTATE as five 6-bit characters (MAKE_SQLSTATE)."""
    return "".join(chr(((code >> (6 * i)) & 0x3F) + ord("0")) for i in range(5))


parse_sockaddr = common.parse_sockaddr
load_base_expr = common.load_base_expr


class PostgresTarget(Target):
    name = "postgres"
    c_file = "postgres.c"
    duration_metric = "db.server.operation.duration"
    metric_attributes = (DB.DB_SYSTEM_NAME, DB.DB_OPERATION_NAME, ERROR.ERROR_TYPE)
    kernel_histograms = True
    inflight_keyed_by_tid = True

    def __init__(self) -> None:
        self._pending: dict[tuple[int, int], tuple[bytes, int]] = {}

    def hist_attributes(self, dim: int) -> dict[str, object]:
        """probes/postgres.c: kind in bits 0-7, failed in bit 8, SQLSTATE from bit 9."""
        attrs: dict[str, object] = {DB.DB_SYSTEM_NAME: "postgresql",
                                    DB.DB_OPERATION_NAME: sql_operation_name(dim & 0xFF)}
        if dim >> 8 & 1:
            attrs[ERROR.ERROR_TYPE] = sqlstate_text(dim >> 9)
        return attrs

    # --- where -------------------------------------------------------------
    def candidate_paths(self) -> list[str]:
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres")) + [
            p for p in ("/usr/local/pgsql/bin/postgres", "/usr/pgsql/bin/postgres") if os.path.exists(p)
        ]

    def matches_process(self, comm: str, exe: str) -> bool:
        return os.path.basename(exe) in ("postgres", "postmaster")

    def inspect(self, path: str) -> Inspection:
        try:
            info = elf_info(path)
        except ElfError as exc:
            return Inspection(path, False, "usdt", {}, [str(exc)])
        resolved = resolve_probe_points(info, PROBE_POINTS)
        notes = []
        if not info.probes:
            notes.append("built without --enable-dtrace: no USDT probes, nothing to attach")
        version = server_major_version(path)
        if version not in catalog()["port_offsets"]:
            notes.append(f"no struct Port layout for PostgreSQL {version}: db.namespace and "
                         "client address come from the backend's process title instead")
        protocols = self.protocols(info, resolved.present)
        if not protocols["extended protocol (Parse/Bind/Execute)"]:
            notes.append("no query__execute__* probes in PortalRun or no debug_query_string: "
                         "extended-protocol statements (JDBC, asyncpg, psycopg 3 with parameters) are not seen")
        usable = not resolved.missing_required
        return Inspection(path, usable, "usdt", resolved.present, notes, protocols)

    @staticmethod
    def protocols(info: ElfInfo, present: dict[str, bool]) -> dict[str, bool]:
        simple = present.get(f"{PROVIDER}:query__start", False) and present.get(f"{PROVIDER}:query__done", False)
        extended = (present.get(f"{PROVIDER}:query__execute__start", False)
                    and present.get(f"{PROVIDER}:query__execute__done", False)
                    and info.symbol("debug_query_string") is not None)
        return {"simple protocol (Query)": simple, "extended protocol (Parse/Bind/Execute)": extended,
                "errors with SQLSTATE": present.get("errcode()", False) and present.get("errstart()", False)}

    def plan(self, path: str, config: "Config") -> BuildPlan:
        info = elf_info(path)
        resolved = resolve_probe_points(info, PROBE_POINTS)
        require_resolved(path, resolved, "PostgreSQL built without --enable-dtrace?")
        extended = self.protocols(info, resolved.present)["extended protocol (Parse/Bind/Execute)"]
        cold = resolved.present.get("errstart_cold()", False) and not jumps_to(path, info, "errstart_cold", "errstart")
        attach = [a for a in resolved.attach if (extended or not a.fn_name.startswith("on_execute"))
                  and (cold or a.fn_name != "on_errstart_cold")]

        def base(fn: str) -> str:
            offsets = {a.offset for a in attach if a.fn_name == fn}
            return load_base_expr(info, [s.pc for s in info.probes if s.provider == PROVIDER
                                         and s.file_offset in offsets])

        def symbol(name: str) -> int:
            sym = info.symbol(name)
            return sym.vaddr if sym else 0

        version = server_major_version(path)
        offsets = catalog()["port_offsets"].get(version) if symbol("MyProcPort") else None
        cflags = [
            f"-DQUERY_MAX={config.query_max_bytes}", f"-DTAIL_MAX={TAIL_MAX}",
            f"-DARG_QUERY_START={info.usdt_arg_macro(PROVIDER, 'query__start', 1)}",
            f"-DARG_QUERY_DONE={info.usdt_arg_macro(PROVIDER, 'query__done', 1)}",
            f"-DLOAD_BASE_QUERY_DONE={base('on_query_done')}",
            f"-DLOAD_BASE_ABORT={base('on_transaction_abort')}",
            f"-DLOAD_BASE_EXECUTE_START={base('on_execute_start')}",
            f"-DLOAD_BASE_EXECUTE_DONE={base('on_execute_done')}",
            f"-DLOAD_BASE_ERRSTART=({instruction_pointer_expr(info.machine)} - {symbol('errstart')}ULL)",
            f"-DLOAD_BASE_ERRSTART_COLD=({instruction_pointer_expr(info.machine)} - {symbol('errstart_cold')}ULL)",
            f"-DHAVE_ERRSTART={1 if resolved.present.get('errstart()') else 0}",
            f"-DHAVE_ERRSTART_COLD={1 if cold else 0}",
            f"-DPG_ELEVEL_ERROR={20 if version is not None and version < 14 else 21}",
            f"-DSYM_POSTMASTER_PID={symbol('PostmasterPid')}ULL",
            f"-DSYM_MY_PROC_PORT={symbol('MyProcPort')}ULL",
            f"-DSYM_DEBUG_QUERY_STRING={symbol('debug_query_string')}ULL",
            f"-DPORT_OFFSETS={1 if offsets else 0}",
        ]
        notes = []
        if offsets:
            cflags += [f"-DPORT_LADDR={offsets['laddr']}", f"-DPORT_RADDR={offsets['raddr']}",
                       f"-DPORT_DATABASE_NAME={offsets['database_name']}"]
        else:
            notes.append(f"PostgreSQL {version}: struct Port layout unknown; db.namespace from process titles")
        if not extended:
            notes.append("extended-protocol statements are not seen (no query__execute__* probes in PortalRun)")
        if not resolved.present.get("errcode()"):
            notes.append("errcode() not found: failed queries get no SQLSTATE")
        elif not resolved.present.get("errstart()"):
            notes.append("errstart() not found: notices and warnings with a SQLSTATE may mark a statement failed; "
                         "failing Parse/Bind messages are not seen")
        return BuildPlan(cflags, attach, notes)

    # --- what ----------------------------------------------------------------
    def cache_sizes(self) -> dict[str, int]:
        return {"pg_aborts_held": len(self._pending)}

    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        out: list[SpanData] = []
        pending = self._pending
        for raw in records:
            if len(raw) < RECORD.size:
                self.malformed_records += 1
                continue
            start, _end, pid, _postmaster, kind, code = RECORD.unpack_from(raw)[:6]
            if kind == KIND_ABORT_NO_CODE:
                pending[(pid, start)] = (raw, time.monotonic_ns())
                continue
            if kind == KIND_DONE:
                pending.pop((pid, start), None)  # a ROLLBACK: its abort was no error
            out.append(self._span(raw, ctx, error_code=sqlstate_text(code) if kind == KIND_ABORT else None))
        return out

    def flush(self, now_mono_ns: int, ctx: DecodeContext, final: bool = False) -> Iterable[SpanData]:
        expired = [k for k, (_, seen) in self._pending.items() if final or now_mono_ns - seen > ABORT_HOLD_NS]
        # An abort no done followed: an internal error, SQLSTATE XX000.
        return [self._span(self._pending.pop(k)[0], ctx, error_code="XX000") for k in expired]

    def _span(self, raw: bytes, ctx: DecodeContext, error_code: str | None) -> SpanData:
        (start, end, pid, postmaster, _kind, _code, raddr, laddr, database, qlen, protocol, tail_len,
         _flags) = RECORD.unpack_from(raw)
        at = RECORD.size
        query = raw[at:at + qlen]
        tail_at = at + ctx.config.query_max_bytes
        tail = raw[tail_at:tail_at + tail_len] if tail_len else b""
        db_name = database.split(b"\0", 1)[0].decode("utf-8", "replace") or _db_from_title(pid)
        attrs, info, comment = common.query_attributes("postgresql", "postgresql", db_name, query, tail, ctx.config)
        attrs.update(common.client_attributes(raddr))
        _, server_port, _ = common.parse_sockaddr(laddr)
        if server_port:
            attrs[SERVER.SERVER_PORT] = server_port
        if error_code:
            common.set_db_error(attrs, error_code)
        offset = ctx.mono_to_epoch_ns
        span = SpanData(info.summary or "postgresql", KIND_SERVER, start + offset, end + offset, attrs,
                        resource_pid=postmaster or pid, target=self.name, error=error_code is not None,
                        status_message=f"SQLSTATE {error_code}" if error_code else "")
        common.apply_sql_comment(span, comment)
        return span


@lru_cache(maxsize=4096)
def _title_cached(pid: int, start_time: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            title = fh.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        return ""
    m = _CMDLINE_DB_RE.match(title)
    return m.group(2) if m else ""


def _db_from_title(pid: int) -> str:
    """Fallback when struct Port's layout is unknown: "postgres: user db host(port) ..."."""
    fields = process.stat_fields(pid)
    return _title_cached(pid, fields[2]) if fields else ""
