"""PostgreSQL: one SERVER span per query, from the server's USDT probes.

See probes/postgres.c for the kernel side. Failing queries never fire
query__done; they end at transaction__abort with the SQLSTATE that errcode()
saw. An abort with no code is a ROLLBACK (query__done follows at once) or an
internal elog(ERROR): such records wait here briefly for that query__done.
"""
from __future__ import annotations

import glob
import mmap
import os
import re
import socket
import struct
import time
from functools import lru_cache
from importlib import resources
from typing import Iterable

import yaml
from opentelemetry.semconv.attributes import db_attributes as DB
from opentelemetry.semconv.attributes import (
    client_attributes as CLIENT,
    error_attributes as ERROR,
    network_attributes as NETWORK,
    server_attributes as SERVER,
)

from .. import process, sql
from ..elf import ElfError, elf_info
from .base import (
    KIND_SERVER, SQL_OPERATIONS, AttachSpec, BuildPlan, DecodeContext, Inspection, SpanData, Target,
)

PROVIDER = "postgresql"
PROBES = ("query__start", "query__done", "transaction__abort")
KIND_DONE, KIND_ABORT, KIND_ABORT_NO_CODE = 1, 2, 3
# A ROLLBACK's query__done follows its abort within microseconds; wait this long.
ABORT_HOLD_NS = 500_000_000

_HEADER = struct.Struct("<QQIIII28s64s64sII")
_VERSION_RE = re.compile(rb"\(PostgreSQL\) (\d+)(?:\.(\d+))?")
_SOCKET_PORT_RE = re.compile(rb"\.s\.PGSQL\.(\d+)")
_CMDLINE_DB_RE = re.compile(r"^postgres: (?:[^:]+: )?(\S+) (\S+) ")


@lru_cache(maxsize=1)
def catalog() -> dict:
    text = (resources.files("otel_ebpf.usdt") / "postgresql.yaml").read_text()
    return yaml.safe_load(text)


def server_major_version(path: str) -> int | None:
    """The major version a postgres binary reports, read from its own bytes."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            m = _VERSION_RE.search(mm)
            return int(m.group(1)) if m else None
    except (OSError, ValueError):
        return None


def sqlstate_text(code: int) -> str:
    """PostgreSQL packs SQLSTATE as five 6-bit characters (MAKE_SQLSTATE)."""
    return "".join(chr(((code >> (6 * i)) & 0x3F) + ord("0")) for i in range(5))


def parse_sockaddr(raw: bytes) -> tuple[str, int | None, str | None]:
    """(family, port, address) of a struct sockaddr prefix; family "" when unset."""
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET:
        return "ipv4", int.from_bytes(raw[2:4], "big"), socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6:
        return "ipv6", int.from_bytes(raw[2:4], "big"), socket.inet_ntop(socket.AF_INET6, raw[8:24])
    if family == socket.AF_UNIX:
        path = raw[2:].split(b"\0", 1)[0]
        m = _SOCKET_PORT_RE.search(path)
        return "unix", int(m.group(1)) if m else None, path.decode("utf-8", "replace")
    return "", None, None


class PostgresTarget(Target):
    name = "postgres"
    c_file = "postgres.c"
    duration_metric = "db.server.operation.duration"
    metric_attributes = (DB.DB_SYSTEM_NAME, DB.DB_OPERATION_NAME, ERROR.ERROR_TYPE)
    kernel_histograms = True
    inflight_keyed_by_tid = True

    def hist_attributes(self, dim: int) -> dict[str, object]:
        """probes/postgres.c: kind in bits 0-7, failed in bit 8, SQLSTATE from bit 9."""
        op = dim & 0xFF
        attrs: dict[str, object] = {
            DB.DB_SYSTEM_NAME: "postgresql",
            DB.DB_OPERATION_NAME: SQL_OPERATIONS[op] if op < len(SQL_OPERATIONS) else "_OTHER",
        }
        if dim >> 8 & 1:
            attrs[ERROR.ERROR_TYPE] = sqlstate_text(dim >> 9)
        return attrs

    def __init__(self) -> None:
        self._pending: dict[tuple[int, int], tuple[bytes, int]] = {}

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
        present = {f"{PROVIDER}:{p}": bool(info.usdt(PROVIDER, p)) for p in PROBES}
        present["errcode()"] = info.symbol("errcode") is not None
        notes = []
        if not info.probes:
            notes.append("built without --enable-dtrace: no USDT probes, nothing to attach")
        version = server_major_version(path)
        if version not in catalog()["port_offsets"]:
            notes.append(f"no struct Port layout for PostgreSQL {version}: db.namespace and "
                         "client address come from the backend's process title instead")
        usable = all(present[f"{PROVIDER}:{p}"] for p in PROBES)
        return Inspection(path, usable, "usdt", present, notes)

    def plan(self, path: str, config: object) -> BuildPlan:
        info = elf_info(path)
        sites = {p: info.usdt(PROVIDER, p) for p in PROBES}
        missing = [p for p, s in sites.items() if not s]
        if missing:
            raise ElfError(f"{path}: no USDT probe {', '.join(PROVIDER + ':' + m for m in missing)} "
                           "(PostgreSQL built without --enable-dtrace?)")
        def load_base(probe: str) -> str:
            # PIE load base = ip - link-time address of the site (told apart by page offset).
            chain = "0ULL"
            for site in sites[probe]:
                chain = f"((ctx->ip & 0xfff) == {site.pc & 0xFFF:#x} ? ctx->ip - {site.pc}ULL : {chain})"
            return chain

        postmaster_pid = info.symbol("PostmasterPid")
        my_proc_port = info.symbol("MyProcPort")
        version = server_major_version(path)
        offsets = catalog()["port_offsets"].get(version) if my_proc_port else None
        query_max = getattr(config, "query_max_bytes", 1024)
        cflags = [
            f"-DQUERY_MAX={query_max}",
            f"-DARG_QUERY_START={info.usdt_arg_macro(PROVIDER, 'query__start', 1)}",
            f"-DARG_QUERY_DONE={info.usdt_arg_macro(PROVIDER, 'query__done', 1)}",
            f"-DLOAD_BASE_QUERY_DONE={load_base('query__done')}",
            f"-DLOAD_BASE_ABORT={load_base('transaction__abort')}",
            f"-DSYM_POSTMASTER_PID={postmaster_pid.vaddr if postmaster_pid else 0}ULL",
            f"-DSYM_MY_PROC_PORT={my_proc_port.vaddr if my_proc_port else 0}ULL",
            f"-DPORT_OFFSETS={1 if offsets else 0}",
        ]
        notes = []
        if offsets:
            cflags += [f"-DPORT_LADDR={offsets['laddr']}", f"-DPORT_RADDR={offsets['raddr']}",
                       f"-DPORT_DATABASE_NAME={offsets['database_name']}"]
        else:
            notes.append(f"PostgreSQL {version}: struct Port layout unknown; db.namespace from process titles")
        attach = [
            AttachSpec(fn, site.file_offset, f"{PROVIDER}:{probe}", ref_ctr_offset=site.semaphore_offset)
            for probe, fn in (("query__start", "on_query_start"), ("query__done", "on_query_done"),
                              ("transaction__abort", "on_transaction_abort"))
            for site in sites[probe]
        ]
        errcode = info.symbol("errcode")
        if errcode is not None and errcode.file_offset >= 0:
            attach.append(AttachSpec("on_errcode", errcode.file_offset, "errcode()"))
        else:
            notes.append("errcode() not found: failed queries get no SQLSTATE")
        return BuildPlan(cflags, attach, notes)

    # --- what ----------------------------------------------------------------
    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        out: list[SpanData] = []
        pending = self._pending
        for raw in records:
            (start, end, pid, postmaster, kind, code, raddr, laddr, database, qlen, _pad) = \
                _HEADER.unpack_from(raw)
            if kind == KIND_ABORT_NO_CODE:
                pending[(pid, start)] = (raw, time.monotonic_ns())
                continue
            if kind == KIND_DONE and pending.pop((pid, start), None) is not None:
                pass  # a ROLLBACK: its abort was no error
            out.append(self._span(raw, ctx, error_code=sqlstate_text(code) if kind == KIND_ABORT else None))
        return out

    def flush(self, now_mono_ns: int, ctx: DecodeContext, final: bool = False) -> Iterable[SpanData]:
        expired = [k for k, (_, seen) in self._pending.items() if final or now_mono_ns - seen > ABORT_HOLD_NS]
        # An abort no query__done followed: an internal error, SQLSTATE XX000.
        return [self._span(self._pending.pop(k)[0], ctx, error_code="XX000") for k in expired]

    def _span(self, raw: bytes, ctx: DecodeContext, error_code: str | None) -> SpanData:
        (start, end, pid, postmaster, kind, code, raddr, laddr, database, qlen, _pad) = \
            _HEADER.unpack_from(raw)
        # qlen counts the NUL bpf_probe_read_user_str ends with: without it, the SQL cache's
        # literal-free fast path applies (queries differing in literals share one analysis).
        query = raw[_HEADER.size:_HEADER.size + qlen - 1] if qlen else b""
        config = ctx.config
        info = sql.analyze(query, "postgresql")
        attrs: dict[str, object] = {DB.DB_SYSTEM_NAME: "postgresql"}
        db_name = database.split(b"\0", 1)[0].decode("utf-8", "replace") or _db_from_title(pid)
        if db_name:
            attrs[DB.DB_NAMESPACE] = db_name
        if getattr(config, "capture_raw_query", False):
            attrs[DB.DB_QUERY_TEXT] = query.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif info.text:
            attrs[DB.DB_QUERY_TEXT] = info.text
        if info.summary:
            attrs[DB.DB_QUERY_SUMMARY] = info.summary
        if info.operation:
            attrs[DB.DB_OPERATION_NAME] = info.operation
        family, port, address = parse_sockaddr(raddr)
        if family in ("ipv4", "ipv6"):
            attrs[CLIENT.CLIENT_ADDRESS] = address
            attrs[CLIENT.CLIENT_PORT] = port
            attrs[NETWORK.NETWORK_TRANSPORT] = "tcp"
        elif family == "unix":
            attrs[NETWORK.NETWORK_TRANSPORT] = "unix"
        _, server_port, _ = parse_sockaddr(laddr)
        if server_port:
            attrs[SERVER.SERVER_PORT] = server_port
        if error_code:
            attrs[DB.DB_RESPONSE_STATUS_CODE] = error_code
            attrs[ERROR.ERROR_TYPE] = error_code
        offset = ctx.mono_to_epoch_ns
        return SpanData(
            info.summary or "postgresql", KIND_SERVER, start + offset, end + offset, attrs,
            resource_pid=postmaster or pid, target=self.name,
            error=error_code is not None,
            status_message=f"SQLSTATE {error_code}" if error_code else "",
        )


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
