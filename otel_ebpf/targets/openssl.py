"""OpenSSL: CLIENT and SERVER spans for HTTP/1.x, read from the plaintext of libssl calls.

The kernel side (probes/openssl.c) sends one record per SSL_read/SSL_write call
(and their _ex variants) with the first bytes of its plaintext, plus a record
when an SSL object that carried data is freed. Here, per connection (pid, SSL
pointer), the two directions go through otel_ebpf.http's framing parsers:

* the side that carries requests is found from the first request line seen: a
  process that *writes* a request is the client of that connection (CLIENT
  spans), one that *reads* it is the server (SERVER spans);
* an exchange lasts from the call holding the request's first byte (a write's
  entry for clients, a read's return for servers) to the return of the call
  holding its response's last byte;
* bodies are never kept, only counted, with the length each call really moved,
  so a capture limit of a few KiB still frames a 1 MB response; bytes the kernel
  did not copy, or lost in a full ring buffer (seen through the stream offsets),
  either fall inside a body or lose that message's framing, which comes back at
  the next call that starts a message.

Only the request line, Host and User-Agent leave this module (query values
redacted); nothing else of the headers or bodies is kept. Connections that are
not HTTP/1.x (HTTP/2, other protocols over TLS, upgrades) are counted and dropped.
nginx processes are skipped while the nginx target is enabled: its own uprobes
give it server-side timing and routes.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Iterable

from opentelemetry.semconv.attributes import (
    error_attributes as ERROR,
    http_attributes as HTTP,
    network_attributes as NETWORK,
    server_attributes as SERVER,
    url_attributes as URL,
    user_agent_attributes as USER_AGENT,
)

from .. import http, process, tracecontext
from ..contract import layout
from ..elf import ElfError, elf_info
from . import registry
from .base import (
    KIND_CLIENT, KIND_SERVER, BuildPlan, DecodeContext, Inspection, ProbePoint, SpanData, Target, resolve_probe_points,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

# libssl of OpenSSL 3 and 1.1 (not NSS's libssl3.so, not GnuTLS's compatibility library).
LIBSSL_NAME = re.compile(r"^libssl\.so\.(3|1\.1)$")
MAPS_RECHECK_S = 30.0  # how often a known process's maps are read again for a late libssl
_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/usr/local/lib64")
# (function, BPF entry function); each also gets the shared return probe.
FUNCTIONS = (("SSL_read", "on_read_entry"), ("SSL_write", "on_write_entry"),
             ("SSL_read_ex", "on_read_ex_entry"), ("SSL_write_ex", "on_write_ex_entry"))
REQUIRED = ("SSL_read", "SSL_write")
PROBE_POINTS = tuple(
    point for fn, entry in FUNCTIONS for point in (
        ProbePoint(entry, symbols=(fn,), required=fn in REQUIRED),
        ProbePoint("on_return", symbols=(fn,), retprobe=True, required=fn in REQUIRED),
    )) + (ProbePoint("on_free", symbols=("SSL_free",), required=False),)

DEFAULT_CAPTURE_BYTES = 4096  # a request line and its headers; bodies are only counted
CAPTURE_RANGE = (64, 16384)
KERNEL_CONNECTIONS = 16384  # stream offsets kept in the kernel (LRU)
MAX_CONNECTIONS = 4096  # connections followed here; the least recently used go first
MAX_PIPELINED = 64  # requests waiting for their responses on one connection
IDLE_EXPIRY_NS = 300 * 10**9  # state of a connection silent this long is dropped
UNTIL_CLOSE_IDLE_NS = 30 * 10**9  # a body that runs until close, with no close seen, ends here
MAX_UNRECOGNIZED = 64  # calls with no request line on a fresh connection before it is ignored
EXPIRY_PERIOD_NS = 10**9

DIR_READ, DIR_WRITE, DIR_CLOSE = 0, 1, 2
RECORD = layout("openssl.h", "tls_head", [
    ("start_ns", "Q"), ("end_ns", "Q"), ("ssl", "Q"), ("offset", "Q"), ("length", "Q"), ("pid", "I"),
    ("tid", "I"), ("direction", "I"), ("captured", "I"), ("comm", "16s"),
])
_HEADER = RECORD.struct

_ROLE_IGNORED = -1  # a connection that is not HTTP/1.x, or no longer (upgraded)


class _Record:
    """One decoded ring buffer record."""

    __slots__ = ("start_ns", "end_ns", "ssl", "offset", "length", "pid", "direction", "comm", "data")

    def __init__(self, raw: bytes):
        (self.start_ns, self.end_ns, self.ssl, self.offset, self.length, self.pid, _tid,
         self.direction, captured, comm) = _HEADER.unpack_from(raw)
        self.comm = comm
        self.data = raw[_HEADER.size:_HEADER.size + captured]

    @property
    def begin_ns(self) -> int:
        """When a message starting in this call began: a write's entry, a read's return
        (a blocking read may wait long before its bytes arrive)."""
        return self.start_ns if self.direction == DIR_WRITE else self.end_ns


class _Exchange:
    """A request, and its response once its head is seen."""

    __slots__ = ("request", "start_ns", "response")

    def __init__(self, request: http.RequestHead, start_ns: int):
        self.request = request
        self.start_ns = start_ns
        self.response: http.ResponseHead | None = None


class _Connection:
    __slots__ = ("pid", "role", "request_dir", "requests", "responses", "sniffers", "exchanges",
                 "expected", "begin_ns", "last_seen_ns", "last_response_ns", "unrecognized")

    def __init__(self, pid: int):
        self.pid = pid
        self.role: int | None = None  # KIND_CLIENT, KIND_SERVER, _ROLE_IGNORED; None until a request
        self.request_dir = DIR_WRITE
        self.requests: http.RequestStream | None = None
        self.responses: http.ResponseStream | None = None
        # Before the role is known, each direction is tried as the request side.
        self.sniffers: list[http.RequestStream] | None = [http.RequestStream(), http.RequestStream()]
        self.exchanges: collections.deque[_Exchange] = collections.deque()
        self.expected: list[int | None] = [None, None]  # next stream offset per direction
        self.begin_ns = [0, 0]  # when the message in progress began, per direction
        self.last_seen_ns = 0
        self.last_response_ns = 0
        self.unrecognized = 0

    def ignore(self) -> None:
        self.role = _ROLE_IGNORED
        self.requests = self.responses = self.sniffers = None
        self.exchanges.clear()


def capture_bytes(config: "Config") -> int:
    """Plaintext bytes copied per call: `tls_capture_bytes` when the config has a valid one."""
    value = config.tls_capture_bytes
    low, high = CAPTURE_RANGE
    if not isinstance(value, int) or value < low or value > high or value & (value - 1):
        return DEFAULT_CAPTURE_BYTES
    return value


def split_host(host: str | None) -> tuple[str | None, int | None]:
    """(address, port) of a Host header: "example.com:8443", "[::1]:443", "example.com"."""
    if not host:
        return None, None
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        address, _, port_text = host.partition(":")
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else None
    return address or None, port


class OpensslTarget(Target):
    name = "openssl"
    c_file = "openssl.c"
    duration_metric = "http.server.request.duration"
    client_duration_metric = "http.client.request.duration"
    metric_attributes = (HTTP.HTTP_REQUEST_METHOD, HTTP.HTTP_RESPONSE_STATUS_CODE, URL.URL_SCHEME,
                         NETWORK.NETWORK_PROTOCOL_VERSION, ERROR.ERROR_TYPE)
    client_metric_attributes = metric_attributes + (SERVER.SERVER_ADDRESS, SERVER.SERVER_PORT)
    kernel_histograms = False

    def __init__(self) -> None:
        self._conns: collections.OrderedDict[tuple[int, int], _Connection] = collections.OrderedDict()
        self._skip_cache: dict[tuple[int, bytes], bool] = {}
        self._nginx_enabled: bool | None = None
        self._next_expiry_ns = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self._maps: dict[tuple[int, int], tuple[float, frozenset[str]]] = {}  # (pid, start) -> (read at, libssl paths)

    def cache_sizes(self) -> dict[str, int]:
        return {"tls_connections": len(self._conns), "tls_processes": len(self._maps), "tls_skip": len(self._skip_cache)}

    # --- where -------------------------------------------------------------------

    def candidate_paths(self) -> list[str]:
        return [os.path.join(d, name) for d in _LIB_DIRS for name in ("libssl.so.3", "libssl.so.1.1")
                if os.path.exists(os.path.join(d, name))]

    def matches_process(self, comm: str, exe: str) -> bool:
        return False  # the library is attached, not executables: see extra_paths

    def extra_paths(self, procs: list) -> list[str]:
        """The libssl files running processes map, as the agent can open them: the path
        itself, and through /proc/PID/root for processes in other mount namespaces
        (the agent attaches once per file identity, so duplicates cost nothing).

        The agent asks every few seconds: a process's maps are read when it is new, then
        again every MAPS_RECHECK_S (a program may load libssl late, as Python does on
        `import ssl`); kernel threads map nothing."""
        now = time.monotonic()
        paths: set[str] = set()
        seen: dict[tuple[int, int], tuple[float, frozenset[str]]] = {}
        for info in procs:
            if not info.exe:
                continue
            key = (info.pid, info.start_time)
            cached = self._maps.get(key)
            if cached is None or now - cached[0] >= MAPS_RECHECK_S:
                cached = (now, frozenset(process.mapped_files(info.pid, LIBSSL_NAME, hint=b"libssl.so")))
            seen[key] = cached
            for path in cached[1]:
                paths.add(path)
                paths.add(f"/proc/{info.pid}/root{path}")
        self._maps = seen  # processes gone are forgotten
        return sorted(paths)

    def inspect(self, path: str) -> Inspection:
        try:
            info = elf_info(path)
        except ElfError as exc:
            return Inspection(path, False, "uprobe", {}, [str(exc)])
        present = resolve_probe_points(info, PROBE_POINTS).present
        notes = []
        if not present.get("SSL_read_ex()"):
            notes.append("no SSL_read_ex/SSL_write_ex (OpenSSL before 1.1.1): only SSL_read/SSL_write are seen")
        notes.append("only programs linked to this library are seen (not statically linked OpenSSL/BoringSSL, "
                     "nor GnuTLS/NSS)")
        usable = all(present.get(f"{fn}()") for fn in REQUIRED)
        return Inspection(path, usable, "uprobe", present, notes)

    def plan(self, path: str, config: "Config") -> BuildPlan:
        info = elf_info(path)
        resolved = resolve_probe_points(info, PROBE_POINTS)
        if resolved.missing_required:
            raise ElfError(f"{path}: no {', '.join(resolved.missing_required)} symbol: not an OpenSSL libssl?")
        notes = [f"{fn} not found: calls through it are not seen"
                 for fn, _ in FUNCTIONS if not resolved.present.get(f"{fn}()")]
        if not resolved.present.get("SSL_free()"):
            notes.append("SSL_free not found: responses that end at connection close end when idle")
        cflags = [f"-DCAPTURE_MAX={capture_bytes(config)}", f"-DCONN_MAX={KERNEL_CONNECTIONS}"]
        return BuildPlan(cflags, resolved.attach, notes)

    # --- what ----------------------------------------------------------------------

    def decode(self, records: list[bytes], ctx: DecodeContext) -> Iterable[SpanData]:
        spans: list[SpanData] = []
        own_pid = os.getpid()
        for raw in records:
            if len(raw) < _HEADER.size:
                self.stats["records.malformed"] += 1
                continue
            rec = _Record(raw)
            if rec.direction not in (DIR_READ, DIR_WRITE, DIR_CLOSE) or rec.length < len(rec.data):
                self.stats["records.malformed"] += 1
                continue
            self.stats["records"] += 1
            if rec.pid == own_pid:
                continue  # the agent's own TLS (OTLP over https) must not feed back into itself
            if self._skipped_process(rec, ctx):
                self.stats["records.nginx_skipped"] += 1
                continue
            if rec.direction == DIR_CLOSE:
                self._on_close(rec, ctx, spans)
            else:
                self._on_data(rec, ctx, spans)
        return spans

    def flush(self, now_mono_ns: int, ctx: DecodeContext, final: bool = False) -> Iterable[SpanData]:
        if not final and now_mono_ns < self._next_expiry_ns:
            return ()
        self._next_expiry_ns = now_mono_ns + EXPIRY_PERIOD_NS
        spans: list[SpanData] = []
        for key, conn in list(self._conns.items()):
            idle = now_mono_ns - conn.last_seen_ns
            if final or idle > IDLE_EXPIRY_NS:
                self.stats["connections.expired" if not final else "connections.flushed"] += 1
                self._finish_connection(conn, ctx, spans)
                del self._conns[key]
            elif conn.responses is not None and conn.responses.until_close and idle > UNTIL_CLOSE_IDLE_NS:
                self._response_events(conn, conn.responses.close(), ctx, spans, conn.last_response_ns)
        return spans

    def counters(self) -> dict[str, int]:
        """What was counted and dropped here (records, connections, parse errors), by reason."""
        return dict(self.stats)

    def metric_of(self, span: SpanData) -> tuple[str, tuple[str, ...]]:
        """The duration metric a span feeds and its attributes: CLIENT spans feed the client metric."""
        if span.kind == KIND_CLIENT:
            return self.client_duration_metric, self.client_metric_attributes
        return self.duration_metric, self.metric_attributes

    # --- connections ---------------------------------------------------------------------

    def _connection(self, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> _Connection:
        key = (rec.pid, rec.ssl)
        conn = self._conns.get(key)
        if conn is None:
            if len(self._conns) >= MAX_CONNECTIONS:
                _, evicted = self._conns.popitem(last=False)
                self.stats["connections.evicted"] += 1
                self._finish_connection(evicted, ctx, spans)
            conn = self._conns[key] = _Connection(rec.pid)
            self.stats["connections"] += 1
        else:
            self._conns.move_to_end(key)
        return conn

    def _on_close(self, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> None:
        conn = self._conns.pop((rec.pid, rec.ssl), None)
        if conn is not None:
            self._finish_connection(conn, ctx, spans)

    def _finish_connection(self, conn: _Connection, ctx: DecodeContext, spans: list[SpanData]) -> None:
        """The connection is gone: a body running until close ends, the rest is unanswered."""
        if conn.responses is not None:
            self._response_events(conn, conn.responses.close(), ctx, spans, conn.last_response_ns)
            if conn.responses.failed and conn.exchanges:
                self._finish_lost_response(conn, ctx, spans)
        self.stats["exchanges.unanswered"] += len(conn.exchanges)
        conn.exchanges.clear()

    def _on_data(self, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> None:
        conn = self._connection(rec, ctx, spans)
        if not self._track_offset(conn, rec, ctx, spans):
            conn = self._connection(rec, ctx, spans)  # the stream restarted: a fresh connection
            self._track_offset(conn, rec, ctx, spans)
        conn.last_seen_ns = rec.end_ns
        if conn.role == _ROLE_IGNORED:
            self.stats["records.ignored"] += 1
        elif conn.role is None:
            self._sniff(conn, rec, ctx, spans)
        elif rec.direction == conn.request_dir:
            self._feed_requests(conn, rec, ctx, spans)
        else:
            self._feed_responses(conn, rec, ctx, spans)

    def _track_offset(self, conn: _Connection, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> bool:
        """Account for bytes lost before this call; False when the stream started over
        (its offset went back: an SSL address reused without the free being seen)."""
        direction = rec.direction
        expected = conn.expected[direction]
        if expected is not None and rec.offset < expected:
            self.stats["connections.restarted"] += 1
            self._finish_connection(conn, ctx, spans)
            del self._conns[(rec.pid, rec.ssl)]
            return False
        conn.expected[direction] = rec.offset + rec.length
        if expected is not None and rec.offset > expected:
            lost = rec.offset - expected
            self.stats["bytes.lost"] += lost
            self._feed_gap(conn, direction, lost, rec, ctx, spans)
        return True

    def _feed_gap(self, conn: _Connection, direction: int, lost: int, rec: _Record,
                  ctx: DecodeContext, spans: list[SpanData]) -> None:
        """Bytes of a lost record: body bytes keep the framing, anything else loses it."""
        if conn.role is None:
            conn.sniffers[direction].reset()  # type: ignore[index]
        elif conn.role != _ROLE_IGNORED:
            if direction == conn.request_dir:
                self._request_events(conn, conn.requests.feed(b"", lost), rec, ctx, spans)  # type: ignore[union-attr]
            else:
                self._response_events(conn, conn.responses.feed(b"", lost), ctx, spans, rec.end_ns)  # type: ignore[union-attr]

    # --- the request side ------------------------------------------------------------------

    def _sniff(self, conn: _Connection, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> None:
        """Before any request line: is this direction the request side of an HTTP/1.x connection?"""
        sniffer = conn.sniffers[rec.direction]  # type: ignore[index]
        if sniffer.failed:
            sniffer.reset()  # a new call may start a request (e.g. we joined mid-body)
        events = sniffer.feed(rec.data, rec.length)
        for kind, payload in events:
            if kind == http.BEGIN:
                conn.begin_ns[rec.direction] = rec.begin_ns
            elif kind == http.HEAD:
                self._adopt(conn, rec.direction, sniffer)
                break
            elif kind == http.ERROR:
                if payload == http.ERR_HTTP2:
                    self.stats["connections.http2"] += 1
                    conn.ignore()
                    return
                conn.unrecognized += 1
                self.stats["records.unrecognized"] += 1
                if conn.unrecognized >= MAX_UNRECOGNIZED:
                    self.stats["connections.not_http"] += 1
                    conn.ignore()
                return
        if conn.role is not None:
            self._request_events(conn, events, rec, ctx, spans)

    def _adopt(self, conn: _Connection, request_dir: int, sniffer: http.RequestStream) -> None:
        conn.role = KIND_CLIENT if request_dir == DIR_WRITE else KIND_SERVER
        conn.request_dir = request_dir
        conn.requests = sniffer
        conn.responses = http.ResponseStream()
        conn.sniffers = None
        self.stats["connections.client" if conn.role == KIND_CLIENT else "connections.server"] += 1

    def _feed_requests(self, conn: _Connection, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> None:
        parser = conn.requests
        assert parser is not None
        if parser.failed:
            if not http.looks_like_request_start(rec.data):
                self.stats["records.unframed"] += 1
                return
            parser.reset()  # framing comes back at a call that starts a request
        self._request_events(conn, parser.feed(rec.data, rec.length), rec, ctx, spans)

    def _request_events(self, conn: _Connection, events: list[http.Event], rec: _Record,
                        ctx: DecodeContext, spans: list[SpanData]) -> None:
        for kind, payload in events:
            if kind == http.BEGIN:
                conn.begin_ns[conn.request_dir] = rec.begin_ns
            elif kind == http.HEAD:
                self._new_exchange(conn, payload, conn.begin_ns[conn.request_dir], ctx, spans)  # type: ignore[arg-type]
            elif kind == http.ERROR:
                self.stats[f"requests.{payload}"] += 1

    def _new_exchange(self, conn: _Connection, head: http.RequestHead, start_ns: int,
                      ctx: DecodeContext, spans: list[SpanData]) -> None:
        responses = conn.responses
        assert responses is not None
        if responses.failed and conn.exchanges:
            # A new request means the response whose framing we lost is over (no pipelining).
            self._finish_lost_response(conn, ctx, spans)
        if len(conn.exchanges) >= MAX_PIPELINED:
            self.stats["connections.pipeline_overflow"] += 1
            conn.ignore()
            return
        conn.exchanges.append(_Exchange(head, start_ns))
        responses.expect(head.method)

    # --- the response side -----------------------------------------------------------------

    def _feed_responses(self, conn: _Connection, rec: _Record, ctx: DecodeContext, spans: list[SpanData]) -> None:
        parser = conn.responses
        assert parser is not None
        if parser.failed:
            if not rec.data.startswith(b"HTTP/1."):
                conn.last_response_ns = rec.end_ns  # still inside the response we lost track of
                self.stats["records.unframed"] += 1
                return
            self._finish_lost_response(conn, ctx, spans)
        events = parser.feed(rec.data, rec.length)
        conn.last_response_ns = rec.end_ns
        self._response_events(conn, events, ctx, spans, rec.end_ns)

    def _response_events(self, conn: _Connection, events: list[http.Event], ctx: DecodeContext,
                     spans: list[SpanData], end_ns: int) -> None:
        for kind, payload in events:
            if kind == http.HEAD:
                self._response_head(conn, payload)  # type: ignore[arg-type]
            elif kind == http.END:
                self._response_end(conn, payload, ctx, spans, end_ns)  # type: ignore[arg-type]
            elif kind == http.ERROR:
                self.stats[f"responses.{payload}"] += 1
            if conn.role == _ROLE_IGNORED:
                return

    def _response_head(self, conn: _Connection, head: http.ResponseHead) -> None:
        if head.interim:
            return
        waiting = next((e for e in conn.exchanges if e.response is None), None)
        if waiting is None:
            self.stats["responses.unmatched"] += 1  # its request was not seen (joined mid-exchange)
            return
        waiting.response = head

    def _response_end(self, conn: _Connection, head: http.ResponseHead, ctx: DecodeContext,
                      spans: list[SpanData], end_ns: int) -> None:
        if head is None or head.interim:
            return
        if conn.exchanges and conn.exchanges[0].response is head:
            spans.append(self._span(conn, conn.exchanges.popleft(), end_ns, ctx))
        if conn.responses is not None and conn.responses.tunnel:
            self.stats["connections.upgraded"] += 1  # 101 or CONNECT: no longer HTTP/1.x
            conn.ignore()

    def _finish_lost_response(self, conn: _Connection, ctx: DecodeContext, spans: list[SpanData]) -> None:
        """End the oldest exchange at the last response bytes seen, and frame afresh."""
        exchange = conn.exchanges.popleft() if conn.exchanges else None
        if exchange is not None and exchange.response is not None:
            self.stats["exchanges.framing_lost"] += 1
            spans.append(self._span(conn, exchange, max(conn.last_response_ns, exchange.start_ns), ctx))
        elif exchange is not None:
            self.stats["exchanges.lost"] += 1  # its response head was never seen
        responses = conn.responses
        assert responses is not None
        responses.reset()
        responses.forget_expected()
        for waiting in conn.exchanges:
            responses.expect(waiting.request.method)

    # --- spans -------------------------------------------------------------------------

    def _span(self, conn: _Connection, exchange: _Exchange, end_ns: int, ctx: DecodeContext) -> SpanData:
        request, response = exchange.request, exchange.response
        assert response is not None
        client = conn.role == KIND_CLIENT
        method = request.method if request.method in http.KNOWN_METHODS else "_OTHER"
        status = response.status
        path, query = http.split_target(request.target)
        address, port = split_host(request.host)
        attrs: dict[str, object] = {HTTP.HTTP_REQUEST_METHOD: method}
        if method == "_OTHER":
            attrs[HTTP.HTTP_REQUEST_METHOD_ORIGINAL] = request.method
        attrs[HTTP.HTTP_RESPONSE_STATUS_CODE] = status
        attrs[URL.URL_SCHEME] = "https"
        attrs[URL.URL_PATH] = path
        if query is not None:
            attrs[URL.URL_QUERY] = http.url_query(query, ctx.config.capture_raw_query)
        attrs[NETWORK.NETWORK_PROTOCOL_VERSION] = response.version
        if address:
            attrs[SERVER.SERVER_ADDRESS] = address
            attrs[SERVER.SERVER_PORT] = port or 443
        if client and request.host:
            redacted = f"?{attrs[URL.URL_QUERY]}" if query is not None else ""
            attrs[URL.URL_FULL] = f"https://{request.host}{path}{redacted}"
        if request.user_agent:
            attrs[USER_AGENT.USER_AGENT_ORIGINAL] = request.user_agent
        # HTTP semconv: a server's 4xx is the client's doing, so only 5xx fail a SERVER span.
        failed = status >= 400 if client else status >= 500
        if failed:
            attrs[ERROR.ERROR_TYPE] = str(status)
        offset = ctx.mono_to_epoch_ns
        span = SpanData(method if method != "_OTHER" else "HTTP", KIND_CLIENT if client else KIND_SERVER,
                        exchange.start_ns + offset, end_ns + offset, attrs,
                        resource_pid=conn.pid, target=self.name, error=failed)
        # The request's trace context: a server's span is the child of the caller's span; a
        # client's span joins the trace its own instrumentation started (the header's span).
        if request.traceparent:
            tracecontext.join(span, request.traceparent, request.tracestate)
        return span

    # --- nginx: its own target wins ------------------------------------------------------

    def _skipped_process(self, rec: _Record, ctx: DecodeContext) -> bool:
        """Records of nginx processes while the nginx target is enabled: that target reports
        their requests with server-side timing and routes, so they would be counted twice."""
        if self._nginx_enabled is None:
            enabled = ctx.config.targets or tuple(registry.available())
            self._nginx_enabled = "nginx" in enabled and "nginx" in registry.available()
        if not self._nginx_enabled:
            return False
        key = (rec.pid, rec.comm)
        skip = self._skip_cache.get(key)
        if skip is None:
            if len(self._skip_cache) > 4096:
                self._skip_cache.clear()
            skip = self._skip_cache[key] = self._is_nginx(rec.pid, rec.comm)
        return skip

    @staticmethod
    def _is_nginx(pid: int, comm: bytes) -> bool:
        """What the nginx target would attach to; by the kernel's comm when the process is gone."""
        info = process.proc_info(pid)
        if info is None or not info.exe:
            return comm.split(b"\0", 1)[0] == b"nginx"
        try:
            return registry.get("nginx").matches_process(info.comm, info.exe)
        except Exception:  # noqa: BLE001 - the nginx target failing must not stop this one
            log.debug("nginx target's matches_process failed", exc_info=True)
            return os.path.basename(info.exe) == "nginx"
