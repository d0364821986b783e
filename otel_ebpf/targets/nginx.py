"""nginx: one SERVER span per client request, from two uprobes per request.

See probes/nginx.c for the kernel side: `ngx_http_process_request` (the request
header is parsed) starts a request, `ngx_http_free_request` (just before nginx
writes its access log line) ends it. Neither fires for internal redirects or
subrequests, so one client request is one span; both are exported functions of
every nginx build, so no symbol table is needed.

What the kernel reads in `ngx_http_request_t` and its connection depends on the
nginx version and build. Member offsets come from DWARF when the binary or its
debug file has it, else from usdt/nginx-offsets.yaml (keyed by version and module
signature, both read from the binary's bytes). A build in neither still gets spans
with timing; `doctor` says which attributes are missing. Offsets are passed group by
group: an attribute is exported only when every offset it needs is known.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from opentelemetry.semconv.attributes import (
    client_attributes as CLIENT,
    error_attributes as ERROR,
    http_attributes as HTTP,
    network_attributes as NETWORK,
    server_attributes as SERVER,
    url_attributes as URL,
    user_agent_attributes as USER_AGENT,
)

from .. import http, process, tracecontext
from ..contract import layout
from ..elf import ElfError, dwarf_member_offsets, elf_info
from . import common
from .base import (
    KIND_SERVER, BuildPlan, DecodeContext, Inspection, ProbePoint, SpanData, Target, require_resolved,
    resolve_probe_points,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

START_FUNCTION = "ngx_http_process_request"
END_FUNCTION = "ngx_http_free_request"
URI_MAX = 1024  # the kernel copies up to URI_MAX - 1 bytes of the request URI (path and query)
UA_MAX = 256  # and up to UA_MAX - 1 bytes of the User-Agent header

# Table sections -> the C type DWARF names them by, and the members the kernel reads.
STRUCT_TYPES = {"request": "ngx_http_request_t", "connection": "ngx_connection_t", "table_elt": "ngx_table_elt_t"}
MEMBERS: dict[str, tuple[str, ...]] = {
    "request": ("connection", "main", "method", "http_version", "unparsed_uri", "headers_out.status",
                "err_status", "headers_in.user_agent", "start_sec", "start_msec", "headers_in.headers"),
    "connection": ("sockaddr", "local_sockaddr", "ssl", "sent"),
    "table_elt": ("value", "hash", "key", "@size"),
}
# -D macro of probes/nginx.c -> (table section, member).
MACROS: dict[str, tuple[str, str]] = {
    "R_CONNECTION": ("request", "connection"), "R_MAIN": ("request", "main"),
    "R_METHOD": ("request", "method"), "R_HTTP_VERSION": ("request", "http_version"),
    "R_UNPARSED_URI": ("request", "unparsed_uri"), "R_STATUS": ("request", "headers_out.status"),
    "R_ERR_STATUS": ("request", "err_status"), "R_USER_AGENT": ("request", "headers_in.user_agent"),
    "R_START_SEC": ("request", "start_sec"), "R_START_MSEC": ("request", "start_msec"),
    "C_SOCKADDR": ("connection", "sockaddr"), "C_LOCAL_SOCKADDR": ("connection", "local_sockaddr"),
    "C_SSL": ("connection", "ssl"), "C_SENT": ("connection", "sent"), "TE_VALUE": ("table_elt", "value"),
    "R_HEADERS": ("request", "headers_in.headers"), "TE_HASH": ("table_elt", "hash"),
    "TE_KEY": ("table_elt", "key"), "TE_SIZE": ("table_elt", "@size"),
}
# Attribute groups of probes/nginx.c (HAVE_<group>): the macros each needs, and what it gives.
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "MAIN": (("R_MAIN",), "the subrequest guard"),
    "METHOD": (("R_METHOD",), "http.request.method (and the span name)"),
    "VERSION": (("R_HTTP_VERSION",), "network.protocol.version"),
    "STATUS": (("R_CONNECTION", "R_STATUS", "R_ERR_STATUS", "C_SENT"),
               "http.response.status_code (and the error status of 5xx)"),
    "URI": (("R_UNPARSED_URI",), "url.path and url.query"),
    "CLIENT": (("R_CONNECTION", "C_SOCKADDR"), "client.address and client.port"),
    "SERVER": (("R_CONNECTION", "C_LOCAL_SOCKADDR"), "server.port"),
    "SCHEME": (("R_CONNECTION", "C_SSL"), "url.scheme"),
    "UA": (("R_USER_AGENT", "TE_VALUE"), "user_agent.original"),
    "NGX_START": (("R_START_SEC", "R_START_MSEC"),
                  "spans for requests rejected before their header was parsed (400, 408, ...)"),
    "TRACEPARENT": (("R_HEADERS", "TE_HASH", "TE_KEY", "TE_VALUE", "TE_SIZE"),
                    "trace context from the traceparent header"),
}

# Record flags (probes/nginx.c F_*).
F_METHOD, F_VERSION, F_STATUS, F_URI, F_CLIENT, F_SERVER, F_SCHEME, F_UA, F_NGX_START, F_URI_CUT, F_TRACEPARENT = (
    1 << i for i in range(11))

# NGX_HTTP_* method bits (ngx_http_request.h, stable since nginx 1.x) -> method name.
METHOD_NAMES = {0x2: "GET", 0x4: "HEAD", 0x8: "POST", 0x10: "PUT", 0x20: "DELETE", 0x40: "MKCOL",
                0x80: "COPY", 0x100: "MOVE", 0x200: "OPTIONS", 0x400: "PROPFIND", 0x800: "PROPPATCH",
                0x1000: "LOCK", 0x2000: "UNLOCK", 0x4000: "PATCH", 0x8000: "TRACE", 0x10000: "CONNECT"}
HTTP_VERSIONS = {9: "0.9", 1000: "1.0", 1001: "1.1", 2000: "2", 3000: "3"}
# Protocol version index in a histogram key (probes/nginx.c hist_dim()); 6 = other.
VERSION_BY_INDEX = {1: "0.9", 2: "1.0", 3: "1.1", 4: "2", 5: "3"}
SCHEME_BY_INDEX = {1: "http", 2: "https"}

PROBE_POINTS = (ProbePoint("on_request_start", symbols=(START_FUNCTION,)),
                ProbePoint("on_request_end", symbols=(END_FUNCTION,)))

# struct nginx_event up to data[] (probes/nginx.h); the User-Agent and the URI follow.
RECORD = layout("nginx.h", "nginx_event", [
    ("start_ns", "Q"), ("end_ns", "Q"), ("start_wall_ms", "Q"), ("pid", "I"), ("flags", "I"), ("method", "I"),
    ("http_version", "I"), ("status", "I"), ("server_port", "H"), ("https", "B"), ("pad", "B"),
    ("ua_len", "I"), ("uri_len", "I"), ("client", "28s"), ("tp_len", "I"), ("traceparent", "64s"),
], tail="data")
_DATA = RECORD.size
# Members read as more than 8 bytes (ngx_str_t: len, data; ngx_list_t up to its first
# part's nelts); the others are 8 (pointers, integers). TE_SIZE is no member at all.
_WIDTH = {"R_UNPARSED_URI": 16, "R_HEADERS": 24}
_NOT_READ = {"TE_SIZE", "TE_HASH", "TE_KEY", "TE_VALUE"}

_VERSION_RE = rb"nginx/(\d+\.\d+\.\d+)"
_SIGNATURE_RE = rb"(\d+,\d+,\d+,[01]{20,})\0"
MASTER_CACHE_S = 10.0  # how long a worker -> master answer is reused


# --- the build: version, signature, layout --------------------------------------------


def offset_table() -> list[dict]:
    return common.catalog("nginx-offsets.yaml").get("builds", [])


def build_identity(path: str) -> tuple[str | None, str | None]:
    """(version, module signature) read from an nginx binary's bytes; None when absent."""
    version = common.search_binary(path, _VERSION_RE)
    signature = common.search_binary(path, _SIGNATURE_RE)
    return (version[0].decode() if version else None, signature[0].decode() if signature else None)


@dataclass(frozen=True)
class Layout:
    """Where the members the kernel reads are, for one nginx binary."""

    source: str  # "DWARF in <file>", "usdt/nginx-offsets.yaml", or "" when neither has it
    offsets: dict[tuple[str, str], int] = field(default_factory=dict)

    def groups(self) -> dict[str, bool]:
        return {g: all(MACROS[m] in self.offsets for m in macros) for g, (macros, _) in GROUPS.items()}

    def cflags(self) -> list[str]:
        have = self.groups()
        flags = [f"-DHAVE_{g}={int(ok)}" for g, ok in have.items()]
        needed = {m for g, ok in have.items() if ok for m in GROUPS[g][0]}
        flags += [f"-D{m}={self.offsets[MACROS[m]]}" for m in sorted(needed)]
        # The kernel reads each struct's members in one go: the bytes up to the last one.
        for block, prefix in (("R_BLOCK", "R_"), ("C_BLOCK", "C_")):
            ends = [self.offsets[MACROS[m]] + _WIDTH.get(m, 8) for m in needed
                    if m.startswith(prefix) and m not in _NOT_READ]
            flags.append(f"-D{block}={(max(ends, default=0) + 7) // 8 * 8}")
        return flags

    def missing_notes(self) -> list[str]:
        missing = [GROUPS[g][1] for g, ok in self.groups().items() if not ok]
        if not missing:
            return []
        if not self.source:
            return [f"no DWARF and this build is not in usdt/nginx-offsets.yaml (tools/nginx_offsets.sh adds "
                    f"it, see docs/nginx.md): spans carry timing only, without {'; '.join(missing)}"]
        return [f"struct layout from {self.source} is incomplete: spans lack {'; '.join(missing)}"]


def layout_from_table(version: str | None, signature: str | None) -> Layout | None:
    for build in offset_table():
        if str(build.get("version")) != version or build.get("signature") != signature:
            continue
        try:
            offsets = {(section, member): int(value)
                       for section in MEMBERS for member, value in (build.get(section) or {}).items()}
        except (TypeError, ValueError, AttributeError):
            log.warning("nginx: usdt/nginx-offsets.yaml: malformed entry for %s %s, ignored", version, signature)
            return None
        return Layout("usdt/nginx-offsets.yaml", offsets)
    return None


def layout_from_dwarf(path: str) -> Layout | None:
    wanted = {STRUCT_TYPES[section]: members for section, members in MEMBERS.items()}
    try:
        source, found = dwarf_member_offsets(path, wanted, cu_hint="ngx_http_request.c")
    except ElfError:
        return None
    offsets = {(section, member): found[STRUCT_TYPES[section]][member]
               for section, members in MEMBERS.items() for member in members
               if member in found.get(STRUCT_TYPES[section], {})}
    return Layout(f"DWARF in {source}", offsets) if offsets else None


@functools.lru_cache(maxsize=32)
def _layout_cached(path: str, dev: int, ino: int, mtime: int) -> Layout:
    dwarf = layout_from_dwarf(path)
    if dwarf is not None:
        return dwarf
    version, signature = build_identity(path)
    return layout_from_table(version, signature) or Layout("")


def layout_for(path: str) -> Layout:
    """The struct layout of an nginx binary, cached per file identity."""
    st = os.stat(path)
    return _layout_cached(path, st.st_dev, st.st_ino, st.st_mtime_ns)


# --- decoding helpers ---------------------------------------------------------------------


def nginx_hash(name: str) -> int:
    """nginx's hash of a lower-case header name (ngx_hash: h * 31 + c), as it keeps it for
    every header it parsed (ngx_table_elt_t.hash)."""
    h = 0
    for c in name.lower().encode():
        h = (h * 31 + c) & 0xFFFFFFFFFFFFFFFF
    return h


def client_endpoint(raw: bytes) -> tuple[str, int] | None:
    """(address, port) of a struct sockaddr_in / sockaddr_in6, None for other families."""
    family, port, address = common.parse_sockaddr(raw)
    return (address, port) if family in ("ipv4", "ipv6") and address and port is not None else None


def method_attributes(method_bit: int) -> tuple[str, str | None]:
    """(http.request.method, http.request.method_original or None) of an NGX_HTTP_* bit."""
    name = METHOD_NAMES.get(method_bit)
    if name in http.KNOWN_METHODS:
        return name, None
    return "_OTHER", name


class NginxTarget(Target):
    name = "nginx"
    c_file = "nginx.c"
    duration_metric = "http.server.request.duration"
    metric_attributes = (HTTP.HTTP_REQUEST_METHOD, URL.URL_SCHEME, HTTP.HTTP_RESPONSE_STATUS_CODE,
                         NETWORK.NETWORK_PROTOCOL_VERSION)
    kernel_histograms = True

    def __init__(self) -> None:
        self._masters: dict[int, tuple[int, float]] = {}
        self.malformed_records = 0  # records shorter than their header says (never expected)

    # --- where -------------------------------------------------------------------

    def candidate_paths(self) -> list[str]:
        return ["/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]

    def matches_process(self, comm: str, exe: str) -> bool:
        return os.path.basename(exe) == "nginx"

    def inspect(self, path: str) -> Inspection:
        try:
            info = elf_info(path)
            layout = layout_for(path)
        except (ElfError, OSError) as exc:
            return Inspection(path, False, "uprobe", {}, [str(exc)])
        present = resolve_probe_points(info, PROBE_POINTS).present
        version, signature = build_identity(path)
        notes = [f"nginx {version or '(version not found)'}, module signature {signature or '(not found)'}"
                 + (f": struct layout from {layout.source}" if layout.source else "")]
        if not all(present.values()):
            notes.append(f"{START_FUNCTION}/{END_FUNCTION} not found in .dynsym or .symtab: "
                         "a stripped build without exported symbols cannot be probed")
        notes += layout.missing_notes()
        return Inspection(path, all(present.values()), "uprobe", present, notes)

    def plan(self, path: str, config: "Config") -> BuildPlan:
        info = elf_info(path)
        resolved = resolve_probe_points(info, PROBE_POINTS)
        require_resolved(path, resolved, "not in .dynsym or .symtab: a stripped nginx build without exported symbols?")
        try:
            layout = layout_for(path)
        except OSError as exc:
            raise ElfError(f"{path}: {exc.strerror}") from exc
        cflags = [f"-DURI_MAX={URI_MAX}", f"-DUA_MAX={UA_MAX}", f"-DTRACEPARENT_HASH={nginx_hash('traceparent')}ULL",
                  *layout.cflags()]
        attach = resolved.attach
        notes = [f"struct layout from {layout.source}"] if layout.source else []
        return BuildPlan(cflags, attach, notes + layout.missing_notes())

    # --- what ---------------------------------------------------------------------------

    def hist_attributes(self, dim: int) -> dict[str, object]:
        method_bit, scheme, version, status = dim >> 32, (dim >> 24) & 0xFF, (dim >> 16) & 0xFF, dim & 0xFFFF
        attrs: dict[str, object] = {}
        if method_bit:
            attrs[HTTP.HTTP_REQUEST_METHOD] = method_attributes(method_bit)[0]
        if scheme in SCHEME_BY_INDEX:
            attrs[URL.URL_SCHEME] = SCHEME_BY_INDEX[scheme]
        if status:
            attrs[HTTP.HTTP_RESPONSE_STATUS_CODE] = status
        if version in VERSION_BY_INDEX:
            attrs[NETWORK.NETWORK_PROTOCOL_VERSION] = VERSION_BY_INDEX[version]
        return attrs

    def cache_sizes(self) -> dict[str, int]:
        return {"nginx_masters": len(self._masters)}

    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        out = []
        for raw in records:
            span = self._span(raw, ctx) if len(raw) >= _DATA else None
            if span is None:
                self._malformed(len(raw))
                continue
            out.append(span)
        return out

    def _malformed(self, size: int) -> None:
        self.malformed_records += 1
        if self.malformed_records == 1:
            log.warning("nginx: dropped a %d-byte record that does not hold what its header says "
                        "(probe/decoder mismatch?)", size)

    def _span(self, raw: bytes, ctx: DecodeContext) -> SpanData | None:
        (start, end, start_wall_ms, pid, flags, method_bit, version, status, server_port, https, _,
         ua_len, uri_len, client, tp_len, traceparent) = RECORD.unpack_from(raw)
        uri_at = _DATA + ua_len
        if len(raw) < uri_at + uri_len:
            return None
        offset = ctx.mono_to_epoch_ns
        end_ns = end + offset
        start_ns = start_wall_ms * 1_000_000 if flags & F_NGX_START else start + offset
        attrs: dict[str, object] = {}
        name = "HTTP"
        if flags & F_METHOD:
            method, original = method_attributes(method_bit)
            attrs[HTTP.HTTP_REQUEST_METHOD] = method
            if original:
                attrs[HTTP.HTTP_REQUEST_METHOD_ORIGINAL] = original
            elif method != "_OTHER":
                name = method
        if flags & F_URI:
            self._url(attrs, raw[uri_at:uri_at + uri_len], ctx, cut=bool(flags & F_URI_CUT))
        if flags & F_SCHEME:
            attrs[URL.URL_SCHEME] = "https" if https else "http"
        error = False
        if flags & F_STATUS and status:
            attrs[HTTP.HTTP_RESPONSE_STATUS_CODE] = status
            if status >= 500:  # 4xx are the client's errors, not the server's (HTTP conventions)
                attrs[ERROR.ERROR_TYPE] = str(status)
                error = True
        if flags & F_VERSION and version in HTTP_VERSIONS:
            attrs[NETWORK.NETWORK_PROTOCOL_VERSION] = HTTP_VERSIONS[version]
        if flags & F_SERVER:
            attrs[SERVER.SERVER_PORT] = server_port
        if flags & F_CLIENT:
            endpoint = client_endpoint(client)
            if endpoint:
                attrs[CLIENT.CLIENT_ADDRESS], attrs[CLIENT.CLIENT_PORT] = endpoint
        if flags & F_UA:
            attrs[USER_AGENT.USER_AGENT_ORIGINAL] = raw[_DATA:uri_at].decode("utf-8", "replace")
        span = SpanData(name, KIND_SERVER, min(start_ns, end_ns), end_ns, attrs,
                        resource_pid=self.resource_process(pid), target=self.name, error=error)
        if flags & F_TRACEPARENT:
            tracecontext.join(span, traceparent[:min(tp_len, len(traceparent))])
        return span

    @staticmethod
    def _url(attrs: dict[str, object], uri: bytes, ctx: DecodeContext, cut: bool) -> None:
        """url.path and url.query from the request URI as the client sent it (before any
        rewrite or internal redirect). A URI longer than URI_MAX keeps its path's first
        URI_MAX bytes and loses its query, whose end is unknown."""
        path, sep, query = uri.decode("utf-8", "replace").partition("?")
        if path:
            attrs[URL.URL_PATH] = path
        if sep and not cut:
            attrs[URL.URL_QUERY] = http.url_query(query, ctx.config.capture_raw_query)

    def resource_process(self, pid: int) -> int:
        """The nginx master for a worker (so that reloads keep one Resource), else the pid."""
        now = time.monotonic()
        cached = self._masters.get(pid)
        if cached is not None and now - cached[1] < MASTER_CACHE_S:
            return cached[0]
        master = _nginx_parent(pid) or pid
        if len(self._masters) > 4096:
            self._masters.clear()
        self._masters[pid] = (master, now)
        return master


def _nginx_parent(pid: int) -> int | None:
    """The parent of `pid` when it is an nginx process (the master of a worker)."""
    fields = process.stat_fields(pid)
    if fields is None or fields[1] <= 1:
        return None
    parent = process.proc_info(fields[1])
    if parent is None or not (parent.comm == "nginx" or os.path.basename(parent.exe) == "nginx"):
        return None
    return parent.pid
