"""Helpers several targets share: catalogs, version strings, socket addresses, DB attributes.

Written once here so that targets stay small; pure except for reading files.
"""
from __future__ import annotations

import functools
import json
import mmap
import os
import re
import socket
from importlib import resources
from typing import TYPE_CHECKING, Iterable

import yaml
from opentelemetry.semconv.attributes import (
    client_attributes as CLIENT,
    db_attributes as DB,
    error_attributes as ERROR,
    network_attributes as NETWORK,
)

from .. import cachestore, sql, sqlcommenter, tracecontext
from ..elf import ElfInfo, instruction_pointer_expr

if TYPE_CHECKING:
    from ..config import Config
    from .base import SpanData


@functools.lru_cache(maxsize=16)
def catalog(filename: str) -> dict:
    """One of the YAML files shipped in usdt/ (probe names, symbols, offset tables)."""
    text = (resources.files("otel_ebpf.usdt") / filename).read_text()
    data = yaml.safe_load(text)
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=64)
def _search_cached(path: str, dev: int, ino: int, mtime: int, pattern: bytes) -> tuple[bytes, ...] | None:
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            m = re.search(pattern, mm)
            return tuple(g or b"" for g in m.groups()) if m else None  # copied out before the map closes
    except (OSError, ValueError):
        return None


def search_binary(path: str, pattern: bytes) -> tuple[bytes, ...] | None:
    """The groups of the first match of `pattern` in a binary's bytes (e.g. its version
    string), cached per file identity in memory and across starts (a regex over a 30 MB
    server binary takes a quarter of a second): a replaced binary is read again."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = f"search/{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}/{pattern.hex()}"
    blob = cachestore.load_blob(cachestore._KIND_SEARCH, key, source=st)
    if blob is not None:
        try:
            stored = json.loads(blob)
            return tuple(g.encode("latin-1") for g in stored) if stored is not None else None
        except (ValueError, TypeError, AttributeError):
            pass  # a bad entry is a miss
    groups = _search_cached(path, st.st_dev, st.st_ino, st.st_mtime_ns, pattern)
    payload = json.dumps([g.decode("latin-1") for g in groups] if groups is not None else None).encode()
    cachestore.store_blob(cachestore._KIND_SEARCH, key, payload, source=st)
    return groups


def load_base_expr(info: ElfInfo, pcs: Iterable[int]) -> str:
    """A C expression giving a PIE's load base at any of the sites `pcs`: the instruction
    pointer minus the site's link-time address (sites told apart by page offset)."""
    ip = instruction_pointer_expr(info.machine)
    chain = "0ULL"
    for pc in pcs:
        chain = f"(({ip} & 0xfff) == {pc & 0xFFF:#x} ? {ip} - {pc}ULL : {chain})"
    return chain



_SOCKET_PORT_RE = re.compile(rb"\.s\.PGSQL\.(\d+)")


def parse_sockaddr(raw: bytes) -> tuple[str, int | None, str | None]:
    """(family, port, address) of a struct sockaddr prefix; family "" when unset.
    Unix socket paths of PostgreSQL (".s.PGSQL.5432") carry the port."""
    if len(raw) < 2:
        return "", None, None
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET and len(raw) >= 8:
        return "ipv4", int.from_bytes(raw[2:4], "big"), socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return "ipv6", int.from_bytes(raw[2:4], "big"), socket.inet_ntop(socket.AF_INET6, raw[8:24])
    if family == socket.AF_UNIX:
        path = raw[2:].split(b"\0", 1)[0]
        m = _SOCKET_PORT_RE.search(path)
        return "unix", int(m.group(1)) if m else None, path.decode("utf-8", "replace")
    return "", None, None


def client_attributes(raw: bytes) -> dict[str, object]:
    """client.address/client.port and network.transport of a peer's struct sockaddr."""
    family, port, address = parse_sockaddr(raw)
    if family in ("ipv4", "ipv6"):
        return {CLIENT.CLIENT_ADDRESS: address, CLIENT.CLIENT_PORT: port, NETWORK.NETWORK_TRANSPORT: "tcp"}
    if family == "unix":
        return {NETWORK.NETWORK_TRANSPORT: "unix"}
    return {}


def query_attributes(system: str, dialect: str, namespace: str, query: bytes, tail: bytes,
                     config: "Config") -> tuple[dict[str, object], sql.SqlInfo, dict[str, str]]:
    """The database attributes of a statement's span, its SQL analysis, and the
    sqlcommenter key/values of its comments (from the head of the text, or from its tail
    when the kernel copied the end of a long query separately)."""
    info = sql.analyze(query, dialect)
    attrs: dict[str, object] = {DB.DB_SYSTEM_NAME: system}
    if namespace:
        attrs[DB.DB_NAMESPACE] = namespace
    if config.capture_raw_query:  # opt-in: literals included
        attrs[DB.DB_QUERY_TEXT] = query.split(b"\0", 1)[0].decode("utf-8", "replace")
    elif info.text:
        attrs[DB.DB_QUERY_TEXT] = info.text
    if info.summary:
        attrs[DB.DB_QUERY_SUMMARY] = info.summary
    if info.operation:
        attrs[DB.DB_OPERATION_NAME] = info.operation
    comment = sqlcommenter.context_from_comments(info.comments) if info.comments else {}
    if tail and not comment:
        comment = sqlcommenter.from_query_tail(tail) or {}
    return attrs, info, comment


def apply_sql_comment(span: "SpanData", comment: dict[str, str]) -> None:
    """Join the application's trace from a sqlcommenter comment's traceparent/tracestate,
    and take the keys semantic conventions have a name for (see docs/trace-context.md)."""
    if not comment:
        return
    tracecontext.join(span, comment.get("traceparent"), comment.get("tracestate"))
    route = comment.get("route")
    if route:
        span.attributes.setdefault("http.route", route)


def set_db_error(attrs: dict[str, object], code: str) -> None:
    attrs[DB.DB_RESPONSE_STATUS_CODE] = code
    attrs[ERROR.ERROR_TYPE] = code
