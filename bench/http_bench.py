"""HTTP/1.x framing per exchange: otel_ebpf.http against httptools (llhttp) and h11.

    .venv/bin/python bench/http_bench.py              # speed: 7 interleaved rounds, a few seconds
    .venv/bin/python bench/http_bench.py --tests      # and the unit tests through each candidate
    .venv/bin/python bench/http_bench.py --rounds 15 --tests

Three candidates behind the interface the OpenSSL target uses (`feed(data, length)`,
`reset()`, `close()`, `expect(method)`, `failed`/`idle`/`until_close`/`tunnel`, BEGIN/HEAD/
END/ERROR events with `RequestHead`/`ResponseHead`):

* **hand** - `otel_ebpf.http.RequestStream`/`ResponseStream` as they are;
* **httptools** - `HttpRequestParser`/`HttpResponseParser` (llhttp) with callbacks;
* **h11** - `h11.Connection` (SERVER role for requests, CLIENT role for responses) with
  `receive_data`/`next_event`.

The adapters below are what a switch would have to ship: each covers what its library
cannot do by itself (the comments say what and why). Bytes the kernel counted but did not
copy (`feed(prefix, length)`) are fed to the libraries as placeholder zero bytes: both need
real bytes to advance their framing.

Exchanges are sequences of SSL_read/SSL_write calls as probes/openssl.c records them: the
first 4 KiB of each call (CAPTURE) and the length the call really moved. Every case runs
each candidate alternately, the order rotated each round; each run is timed on its own,
a round keeps the median of its runs, the table the median of the rounds. Before timing,
every candidate's events are checked against the expected number of requests and
responses: a candidate that frames a case wrongly is marked so, not timed.

`--tests` runs tests/unit/test_http.py and tests/unit/test_openssl_target.py once per
candidate, in a child process with `otel_ebpf.http.RequestStream`/`ResponseStream`
replaced by the candidate's classes, and counts, among the tests that create a stream
(the others test helpers every candidate shares), which pass. Not run by bench/run.py;
docs/http-parsing.md has the numbers and the decision.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import h11  # noqa: E402
import httptools  # noqa: E402

from otel_ebpf import http  # noqa: E402
from otel_ebpf.http import (  # noqa: E402
    BEGIN, END, ERR_BAD_CHUNK, ERR_BAD_HEAD, ERR_HEAD_TOO_LARGE, ERR_HTTP2, ERR_LOST, ERR_NOT_HTTP, ERROR, HEAD,
    MAX_HEAD_BYTES, RequestHead, ResponseHead,
)

CAPTURE = 4096  # probes/openssl.c's default CAPTURE_MAX
# Placeholder bytes for counted-but-unseen body bytes, fed by slices (no allocation per call).
_ZEROS = memoryview(bytes(64 * 1024))
# The only headers a span reads; the adapters pass just these to http._read_fields, so that
# every other header (Authorization, Cookie) goes no further than the library's own copy.
_WANTED = frozenset({b"host", b"user-agent", b"content-length", b"transfer-encoding", b"connection",
                     b"traceparent", b"tracestate"})
_H2_START = b"PRI * HTTP/2.0"

_IDLE, _HEAD, _BODY, _UNTIL_CLOSE, _TUNNEL, _ERROR = range(6)


class _Stop(Exception):
    """Raised from a library callback to stop parsing; the reason is kept by the adapter."""


class _Adapter:
    """State and bookkeeping shared by the library adapters: the library frames, this
    keeps the event list, the message's head, and the states the target asks about."""

    created = 0  # streams made, per class, so that --tests can tell which tests use a parser

    def __init__(self) -> None:
        type(self).created += 1
        self._methods: collections.deque[str] = collections.deque()
        self.reset()

    def reset(self) -> None:
        self._state = _IDLE
        self._events: list[http.Event] = []
        self._head: RequestHead | ResponseHead | None = None
        self.error: str | None = None
        self._start = b""  # the first bytes of the message in progress (HTTP/2 preface, garbage)
        self._head_bytes = 0  # bytes fed while the head was incomplete
        self._fields: list[bytes] = []
        self._placeholders = False
        self._new_parser()

    # --- the interface of otel_ebpf.http's streams --------------------------------------

    @property
    def failed(self) -> bool:
        return self._state == _ERROR

    @property
    def until_close(self) -> bool:
        return self._state == _UNTIL_CLOSE

    @property
    def tunnel(self) -> bool:
        return self._state == _TUNNEL

    @property
    def idle(self) -> bool:
        return self._state == _IDLE

    def expect(self, method: str) -> None:
        self._methods.append(method)

    def forget_expected(self) -> None:
        self._methods.clear()

    def close(self) -> list[http.Event]:
        # Neither library reports the end of a body that runs until close without more
        # calls (httptools has no llhttp_finish); the state says it all anyway.
        self._events = []
        if self._state == _UNTIL_CLOSE:
            self._end()
            self._new_parser()
        return self._events

    def feed(self, data: bytes, length: int | None = None) -> list[http.Event]:
        self._events = []
        try:
            if data and self._state not in (_ERROR, _TUNNEL):
                self._note_start(data)
                self._feed_known(memoryview(data))
            unseen = (len(data) if length is None else length) - len(data)
            if unseen > 0 and self._state not in (_ERROR, _TUNNEL, _UNTIL_CLOSE):
                self._feed_unseen(unseen)
        except Exception as exc:  # noqa: BLE001 - a stream must never raise into the target
            self._fail(self._reason(exc))
        return self._events

    # --- shared pieces -------------------------------------------------------------------

    def _note_start(self, data: bytes) -> None:
        if self._state == _IDLE:
            self._start = bytes(data[:24]).lstrip(b"\r\n")
        elif self._state == _HEAD and len(self._start) < 24:
            self._start += bytes(data[:24 - len(self._start)])

    def _feed_unseen(self, unseen: int) -> None:
        """Bytes counted but not seen: inside a body they are fed as placeholders; where a
        head or a chunk-size line may be, the framing is lost (as in otel_ebpf.http)."""
        if self._state in (_IDLE, _HEAD):
            if self._state == _IDLE:
                self._events.append((BEGIN, None))
            self._fail(ERR_LOST)
            return
        self._placeholders = True
        try:
            while unseen > 0 and self._state == _BODY:
                piece = min(unseen, len(_ZEROS))
                self._feed_placeholders(_ZEROS[:piece])
                unseen -= piece
            if unseen > 0 and self._state == _IDLE:
                self._events.append((BEGIN, None))  # placeholder bytes after the body: a head we never saw
                self._fail(ERR_LOST)
        except Exception:  # noqa: BLE001 - placeholders where framing bytes were: lost
            self._fail(ERR_LOST)
        finally:
            self._placeholders = False

    def _begin(self) -> None:
        self._events.append((BEGIN, None))
        self._state = _HEAD
        self._fields = []
        self._head_bytes = 0

    def _field(self, name: bytes, value: bytes) -> None:
        if name.lower() in _WANTED:
            self._fields.append(name + b":" + value)

    def _head_done(self, head: RequestHead | ResponseHead) -> None:
        """Fill the fields a span needs (the same code as otel_ebpf.http), emit HEAD."""
        problem = http._read_fields(self._fields, head)
        self._fields = []
        if problem:
            raise _Stop(problem)
        if isinstance(head, ResponseHead):
            head.request_method = self._methods[0] if self._methods else None
        self._head = head
        self._state = _BODY
        self._events.append((HEAD, head))

    def _end(self) -> None:
        head = self._head
        self._events.append((END, head))
        self._state = _IDLE
        self._head = None
        if isinstance(head, ResponseHead) and not head.interim and self._methods:
            self._methods.popleft()

    def _fail(self, reason: str) -> None:
        if self._state != _ERROR:
            self._state = _ERROR
            self.error = reason
            self._events.append((ERROR, reason))

    def _check_head_size(self, fed: int) -> None:
        # Neither llhttp nor httptools bounds a head: headers arrive through callbacks and
        # httptools joins a header split across calls into one growing bytes object.
        if self._state == _HEAD:
            self._head_bytes += fed
            if self._head_bytes > MAX_HEAD_BYTES:
                raise _Stop(ERR_HEAD_TOO_LARGE)

    def _reason(self, exc: Exception) -> str:
        """The error reason otel_ebpf.http would give, from a library's exception."""
        if isinstance(exc, _Stop):
            return exc.args[0]
        if self._placeholders:
            return ERR_LOST
        if len(self._start) >= 4 and self._start.startswith(_H2_START[:len(self._start)]):
            return ERR_HTTP2
        if self._state == _BODY:
            return ERR_BAD_CHUNK
        return self._head_reason(str(exc))

    # --- per library ---------------------------------------------------------------------

    def _head_reason(self, message: str) -> str:
        """not_http for a start line the library refused, bad_head for a header."""
        raise NotImplementedError

    def _new_parser(self) -> None:
        raise NotImplementedError

    def _feed_known(self, data: memoryview) -> None:
        raise NotImplementedError

    def _feed_placeholders(self, zeros: memoryview) -> None:
        raise NotImplementedError


# --- httptools (llhttp) ------------------------------------------------------------------------


class _Httptools(_Adapter):
    _parser_class: type = httptools.HttpRequestParser

    def _new_parser(self) -> None:
        self._parser = self._parser_class(self)
        # llhttp refuses data after a message with "Connection: close" (or HTTP/1.0 without
        # keep-alive); the agent sees both directions and frames whatever comes.
        self._parser.set_dangerous_leniencies(lenient_keep_alive=True)
        self._url = b""
        self._any_field = False

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self._begin()
        self._url = b""
        self._any_field = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._any_field = True
        self._field(name, value)

    def on_message_complete(self) -> None:
        head = self._head
        self._end()
        if isinstance(head, ResponseHead) and head.status == 101:
            self._state = _TUNNEL

    def _head_reason(self, message: str) -> str:
        header = self._any_field or any(w in message for w in ("header", "Content-Length", "Transfer-Encoding"))
        return ERR_BAD_HEAD if header else ERR_NOT_HTTP

    def _execute(self, data: memoryview) -> None:
        """Feed llhttp; follow an upgrade pause (its offset) on the request side like the hand
        parser does; turn a callback's _Stop back into its reason."""
        while len(data):
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                if self._state == _TUNNEL:
                    return
                offset = exc.args[0] if exc.args else len(data)
                data = data[offset:]  # a request with Upgrade/CONNECT: HTTP goes on until a 101 says not
                continue
            except httptools.HttpParserCallbackError as exc:
                inner = exc.__context__
                if isinstance(inner, _Stop):
                    if inner.args[0] == "tunnel":
                        return
                    raise inner from None
                raise
            except httptools.HttpParserError:
                if self._state == _TUNNEL:
                    return  # "Pause on CONNECT/Upgrade" after a 101 without "Connection: upgrade"
                raise
            self._check_head_size(len(data))
            return

    def _feed_known(self, data: memoryview) -> None:
        self._execute(data)

    def _feed_placeholders(self, zeros: memoryview) -> None:
        self._execute(zeros)


class HttptoolsRequestStream(_Httptools):
    _parser_class = httptools.HttpRequestParser

    def on_headers_complete(self) -> None:
        version = self._parser.get_http_version()
        method = self._parser.get_method().decode("ascii")
        if method == "PRI" and version == "2.0":
            raise _Stop(ERR_HTTP2)
        if not version.startswith("1."):
            raise _Stop(ERR_NOT_HTTP)  # llhttp accepts 0.9 and 2.0 request lines
        head = RequestHead(method=method, target=self._url.decode("utf-8", "replace"), version=version)
        self._head_done(head)
        if head.other_coding:
            raise _Stop(ERR_BAD_HEAD)  # llhttp refuses it too, but after on_headers_complete


class HttptoolsResponseStream(_Httptools):
    _parser_class = httptools.HttpResponseParser

    def on_headers_complete(self) -> None:
        version = self._parser.get_http_version()
        if not version.startswith("1."):
            raise _Stop(ERR_NOT_HTTP)
        head = ResponseHead(version=version, status=self._parser.get_status_code())
        self._head_done(head)
        method = head.request_method
        if method == "CONNECT" and 200 <= head.status < 300:
            # llhttp does not know the request was CONNECT: stop it, the rest is a tunnel.
            self._end()
            self._state = _TUNNEL
            raise _Stop("tunnel")
        if method == "HEAD" and not 100 <= head.status < 200:
            self._cut = True  # see _feed_known
        elif head.status not in (204, 304) and not 100 <= head.status < 200 \
                and not head.chunked and (head.other_coding or head.content_length is None):
            self._state = _UNTIL_CLOSE

    def _new_parser(self) -> None:
        super()._new_parser()
        self._cut = False

    def _feed_known(self, data: memoryview) -> None:
        pos, n = 0, len(data)
        while pos < n and self._state not in (_ERROR, _TUNNEL):
            if "HEAD" in self._methods:
                # llhttp cannot be told that a response answers HEAD (httptools' on_headers_complete
                # cannot return 1), and it reports no offset where a message ends: while a response
                # to HEAD is awaited, feed one byte at a time, and start a new parser after its
                # head, so that its Content-Length is not read as a body.
                self._execute(data[pos:pos + 1])
                pos += 1
                if self._cut:
                    if self._head is not None:  # llhttp did not end it itself (a Content-Length)
                        self._end()
                    self._new_parser()
                continue
            self._execute(data[pos:])
            pos = n


# --- h11 -----------------------------------------------------------------------------------------


class _H11(_Adapter):
    role: type = h11.SERVER

    def _new_parser(self, leftover: bytes = b"") -> None:
        # max_incomplete_event_size bounds a head (h11 buffers it whole before parsing).
        self._conn = h11.Connection(self.role, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._sent = False
        self._placeholder_left = 0
        if leftover:
            self._conn.receive_data(leftover)

    def _feed_known(self, data: memoryview) -> None:
        if self._state == _IDLE:
            # h11 refuses an empty line before a message (RFC 9112 2.2 says to ignore one).
            data = memoryview(bytes(data).lstrip(b"\r\n"))
            if not data:
                return
            self._maybe_begin(bytes(data))
            if self._state == _ERROR:
                return
        elif self._state == _HEAD and self._early_problem(self._start):
            raise _Stop(self._early_problem(self._start))
        self._conn.receive_data(bytes(data))
        self._drain()

    def _feed_placeholders(self, zeros: memoryview) -> None:
        self._placeholder_left = len(zeros)
        self._conn.receive_data(bytes(zeros))
        self._drain()
        if self._placeholder_left > 0 and self._state == _BODY:
            # h11 waits (NEED_DATA) on zeros where a chunk-size line should be.
            raise _Stop(ERR_LOST)

    def _maybe_begin(self, data: bytes) -> None:
        if data.lstrip(b"\r\n"):
            self._begin()
            problem = self._early_problem(self._start)
            if problem:
                self._fail(problem)

    def _early_problem(self, start: bytes) -> str | None:
        """h11 waits for a whole line (up to max_incomplete_event_size) before it calls bytes
        not HTTP; the target counts unrecognized calls, so garbage must fail at once."""
        raise NotImplementedError

    def _drain(self) -> None:
        while self._state not in (_ERROR, _TUNNEL):
            self._before_next()
            event = self._conn.next_event()  # a new cycle may bring a new Connection
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Data):
                self._placeholder_left -= len(event.data)  # body bytes, copied out by h11
            elif isinstance(event, h11.EndOfMessage):
                self._end()
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
            else:
                self._on_head(event)

    def _before_next(self) -> None:
        pass

    def _next_cycle(self) -> None:
        leftover = self._conn.trailing_data[0].lstrip(b"\r\n")
        if self._placeholders and leftover.strip(b"\x00") == b"" and leftover:
            self._events.append((BEGIN, None))
            raise _Stop(ERR_LOST)
        self._restart(leftover)
        if leftover:
            self._note_start(leftover)
            self._maybe_begin(leftover)

    def _restart(self, leftover: bytes) -> None:
        self._new_parser(leftover)

    def _on_head(self, event: object) -> None:
        raise NotImplementedError

    def _fields_of(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name in _WANTED:  # h11 lowercases names
                self._fields.append(name + b":" + value)

    def _head_reason(self, message: str) -> str:
        if "too long" in message:
            return ERR_HEAD_TOO_LARGE  # "Receive buffer too long": max_incomplete_event_size
        return ERR_NOT_HTTP if "request line" in message or "status line" in message else ERR_BAD_HEAD


class H11RequestStream(_H11):
    role = h11.SERVER

    def _early_problem(self, start: bytes) -> str | None:
        return http.request_start_problem(start[:48])

    def _on_head(self, event: object) -> None:
        assert isinstance(event, h11.Request)
        version = event.http_version.decode("ascii")
        method = event.method.decode("ascii")
        if method == "PRI" and version == "2.0":
            raise _Stop(ERR_HTTP2)
        if not version.startswith("1."):
            raise _Stop(ERR_NOT_HTTP)  # h11 takes any HTTP/d.d
        self._fields_of(event.headers)
        self._head_done(RequestHead(method=method, target=event.target.decode("utf-8", "replace"), version=version))

    def _restart(self, leftover: bytes) -> None:
        # A server Connection waits (PAUSED) for its own response before reading the next
        # request; answering a made-up response costs more than a new Connection.
        self._new_parser(leftover)


class H11ResponseStream(_H11):
    role = h11.CLIENT

    def _early_problem(self, start: bytes) -> str | None:
        prefix = start[:7]
        return None if b"HTTP/1."[:len(prefix)] == prefix else ERR_NOT_HTTP

    def _before_next(self) -> None:
        # h11 learns the request method (HEAD, CONNECT) only from a request it sent itself.
        if not self._sent:
            method = self._methods[0] if self._methods else "GET"
            target = "example.com:443" if method == "CONNECT" else "/"
            # "Upgrade" so that a 101 is accepted: h11 refuses one nobody proposed.
            headers = [("Host", "example.com")] + ([("Upgrade", "any")] if method != "CONNECT" else [])
            self._conn.send(h11.Request(method=method, target=target, headers=headers))
            self._conn.send(h11.EndOfMessage())
            self._sent = True

    def _restart(self, leftover: bytes) -> None:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._sent = False
        else:  # MUST_CLOSE (HTTP/1.0, Connection: close): h11 would refuse anything more
            self._new_parser(leftover)

    def _on_head(self, event: object) -> None:
        assert isinstance(event, (h11.Response, h11.InformationalResponse))
        version = event.http_version.decode("ascii")
        if not version.startswith("1."):
            raise _Stop(ERR_NOT_HTTP)
        self._fields_of(event.headers)
        head = ResponseHead(version=version, status=event.status_code)
        self._head_done(head)
        if isinstance(event, h11.InformationalResponse):
            self._end()  # h11 has no EndOfMessage for a 1xx
            if event.status_code == 101:
                self._state = _TUNNEL
            elif self._placeholders is False:
                leftover = self._conn.trailing_data[0]
                if leftover.lstrip(b"\r\n"):
                    self._note_start(leftover)
                    self._maybe_begin(leftover)
        elif self._conn.their_state is h11.SWITCHED_PROTOCOL:
            self._end()  # a 2xx to CONNECT
            self._state = _TUNNEL
        elif self._conn.their_state is h11.SEND_BODY and head.content_length is None and not head.chunked:
            self._state = _UNTIL_CLOSE


# --- the candidates ------------------------------------------------------------------------


class _CountedRequestStream(http.RequestStream):
    created = 0

    def __init__(self) -> None:
        type(self).created += 1
        super().__init__()


class _CountedResponseStream(http.ResponseStream):
    created = 0

    def __init__(self) -> None:
        type(self).created += 1
        super().__init__()


CANDIDATES: dict[str, tuple[type, type]] = {
    "hand": (http.RequestStream, http.ResponseStream),
    "httptools": (HttptoolsRequestStream, HttptoolsResponseStream),
    "h11": (H11RequestStream, H11ResponseStream),
}
_COUNTED = {"hand": (_CountedRequestStream, _CountedResponseStream)}


# --- exchanges as the kernel records them -----------------------------------------------------

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BROWSER_GET = (
    b"GET /api/v1/orders?page=2&per_page=50 HTTP/1.1\r\n"
    b"Host: shop.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/124.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Referer: https://shop.example.com/cart\r\n"
    b"Cookie: session=9f8e7d6c5b4a39281706f5e4d3c2b1a0; csrftoken=Qw3rTy8uIoP1aSdFgHjKlZxCvBnM; "
    b"_ga=GA1.2.1234567890.1700000000\r\n"
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJl\r\n"
    b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
    b"sec-ch-ua-mobile: ?0\r\n"
    b'sec-ch-ua-platform: "Linux"\r\n'
    b"Sec-Fetch-Dest: empty\r\nSec-Fetch-Mode: cors\r\nSec-Fetch-Site: same-origin\r\n"
    b"traceparent: " + TRACEPARENT + b"\r\n"
    b"Connection: keep-alive\r\n\r\n")


def _curl(method: str, path: str, extra: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.5.0\r\n"
            f"Accept: */*\r\n").encode() + extra + b"\r\n"


def _response(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status}\r\nDate: Mon, 01 Dec 2025 10:00:00 GMT\r\nServer: nginx/1.24.0\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Connection: keep-alive\r\nCache-Control: no-store\r\nETag: W/\"57-a1b2c3\"\r\n"
            f"Strict-Transport-Security: max-age=31536000\r\nX-Request-Id: 5f0c2a9e-1b7d-4c3a\r\n").encode() \
        + extra + b"\r\n" + body


def _calls(side: str, data: bytes, sizes: Iterable[int] | None = None) -> list[tuple[str, bytes, int]]:
    """One call per size (the whole of data by default): (side, captured prefix, length)."""
    out, pos = [], 0
    for size in (sizes or [len(data)]):
        out.append((side, data[pos:pos + min(size, CAPTURE)], size))
        pos += size
    assert pos == len(data), (pos, len(data))
    return out


def _exchanges() -> dict[str, tuple[list[tuple[str, bytes, int]], int]]:
    """name -> (calls, request/response pairs)."""
    cases: dict[str, tuple[list[tuple[str, bytes, int]], int]] = {}
    body = b'{"orders": [{"id": 7, "total": "12.50"}], "page": 2, "next": "/api/v1/orders?page=3"}'
    cases["small GET"] = (_calls("req", BROWSER_GET) + _calls("resp", _response("200 OK", body)), 1)

    post_body = (b'{"items": [' + b", ".join(b'{"sku": "SKU-%05d", "qty": %d}' % (i, i % 5 + 1)
                                            for i in range(70)) + b"]}")[:2048].ljust(2048, b" ")
    head = _curl("POST", "/api/v1/cart", b"Content-Type: application/json\r\nContent-Length: 2048\r\n"
                 b"traceparent: " + TRACEPARENT + b"\r\n")
    # http.client and curl write the head and the body in two calls.
    cases["POST 2 KB"] = (_calls("req", head) + _calls("req", post_body)
                          + _calls("resp", _response("201 Created", b'{"id": 4242}')), 1)

    chunks = [b"%x\r\n" % 1000 + bytes([65 + i]) * 1000 + b"\r\n" for i in range(20)] + [b"0\r\n\r\n"]
    chunk_head = (b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Dec 2025 10:00:00 GMT\r\nServer: uvicorn\r\n"
                  b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    # A streaming server writes the head with its first chunk, then a chunk per write.
    chunked = _calls("resp", chunk_head + chunks[0]) + [c for chunk in chunks[1:] for c in _calls("resp", chunk)]
    cases["chunked, 20 chunks"] = (_calls("req", _curl("GET", "/events")) + chunked, 1)

    requests = b"".join(_curl("GET", f"/api/v1/items/{i}") for i in range(10))
    responses = b"".join(_response("200 OK", b'{"id": %d}' % i) for i in range(10))
    cases["10 pipelined"] = (_calls("req", requests) + _calls("resp", responses), 10)

    mb = 1024 * 1024
    big = _response("200 OK", b"", b"")
    big = big.replace(b"Content-Length: 0", b"Content-Length: %d" % mb)
    total = len(big) + mb
    # SSL_read returns at most one TLS record (16 KiB); the kernel copies the first 4 KiB.
    sizes = [16384] * (total // 16384) + ([total % 16384] if total % 16384 else [])
    stream = big + b"z" * mb
    cases["1 MB, 4 KiB prefixes"] = (_calls("req", _curl("GET", "/big.bin")) + _calls("resp", stream, sizes), 1)

    # The same body, none of it seen: records the ring buffer lost (the target feeds
    # feed(b"", lost)): what counting unseen bytes costs, without the captured prefixes.
    lost = [("resp", b"", size) for size in sizes[1:]]
    first = ("resp", stream[:sizes[0]][:CAPTURE], sizes[0])
    cases["1 MB, records lost"] = ([_calls("req", _curl("GET", "/big.bin"))[0], first] + lost, 1)

    # A response to HEAD carries the Content-Length of the body it does not send.
    head_answer = _response("200 OK", b"").replace(b"Content-Length: 0", b"Content-Length: %d" % mb)
    cases["HEAD, then GET"] = (_calls("req", _curl("HEAD", "/big.bin")) + _calls("resp", head_answer)
                               + _calls("req", _curl("GET", "/small")) + _calls("resp", _response("200 OK", body)), 2)
    return cases


def run_case(streams: tuple[object, object], calls: list[tuple[str, bytes, int]]) -> tuple[int, int, int]:
    """Drive a request and a response stream as the OpenSSL target does; (request ENDs,
    final response ENDs, ERRORs)."""
    requests, responses = streams
    req_ends = resp_ends = errors = 0
    for side, data, length in calls:
        if side == "req":
            for kind, payload in requests.feed(data, length):  # type: ignore[attr-defined]
                if kind == HEAD:
                    responses.expect(payload.method)  # type: ignore[attr-defined]
                elif kind == END:
                    req_ends += 1
                elif kind == ERROR:
                    errors += 1
        else:
            for kind, payload in responses.feed(data, length):  # type: ignore[attr-defined]
                if kind == END and not payload.interim:
                    resp_ends += 1
                elif kind == ERROR:
                    errors += 1
    return req_ends, resp_ends, errors


def measure(rounds: int, budget_ms: float) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], str]]:
    cases = _exchanges()
    wrong: dict[tuple[str, str], str] = {}
    for case, (calls, pairs) in cases.items():
        for impl, (req_cls, resp_cls) in CANDIDATES.items():
            got = run_case((req_cls(), resp_cls()), calls)
            if got != (pairs, pairs, 0):
                wrong[(case, impl)] = f"requests/responses/errors {got}, expected {(pairs, pairs, 0)}"
    # Runs per round from one hand-parser run: a quarter of the per-candidate budget at its speed,
    # leaving room for the slower candidates, so that the whole bench stays within seconds.
    runs: dict[str, int] = {}
    for case, (calls, _) in cases.items():
        start = time.perf_counter()
        run_case((http.RequestStream(), http.ResponseStream()), calls)
        one = (time.perf_counter() - start) * 1e3
        runs[case] = max(3, min(200, int(budget_ms / 3 / max(one, 1e-3) / 4)))
    times: dict[tuple[str, str], list[float]] = {}
    impls = list(CANDIDATES)
    clock = time.perf_counter_ns
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for case, (calls, _) in cases.items():
            for impl in order:
                if (case, impl) in wrong:
                    continue
                req_cls, resp_cls = CANDIDATES[impl]
                streams = (req_cls(), resp_cls())  # one keep-alive connection per batch
                run_case(streams, calls)  # warm
                samples = []
                for _ in range(runs[case]):
                    t0 = clock()
                    run_case(streams, calls)
                    samples.append(clock() - t0)
                times.setdefault((case, impl), []).append(statistics.median(samples) / 1000)
    return times, wrong


def render(times: dict[tuple[str, str], list[float]], wrong: dict[tuple[str, str], str]) -> str:
    cases = _exchanges()
    impls = list(CANDIDATES)
    lines = ["| exchange | calls | bytes | " + " | ".join(f"{i} µs" for i in impls)
             + " | " + " | ".join(f"{i}/hand" for i in impls[1:]) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in impls) + " | "
             + " | ".join("---:" for _ in impls[1:]) + " |"]
    for case, (calls, _) in cases.items():
        total = sum(length for _, _, length in calls)
        med = {i: statistics.median(times[(case, i)]) for i in impls if (case, i) in times}
        cells = [f"{med[i]:.1f}" if i in med else "wrong" for i in impls]
        ratios = [f"{med[i] / med['hand']:.2f}" if i in med and "hand" in med else "-" for i in impls[1:]]
        lines.append(f"| {case} | {len(calls)} | {total} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    notes = [f"- {impl} frames '{case}' wrongly: {why}" for (case, impl), why in sorted(wrong.items())]
    # How far the rounds disagree (half the range of the round medians over their median).
    spread = max(((max(v) - min(v)) / 2 / statistics.median(v), case, impl) for (case, impl), v in times.items())
    notes.append(f"- largest spread between rounds: {spread[0] * 100:.0f} % ({spread[2]}, {spread[1]})")
    return "\n".join(lines + [""] + notes)


# --- the unit tests through each candidate -------------------------------------------------------

TEST_FILES = ("tests/unit/test_http.py", "tests/unit/test_openssl_target.py")


def _run_tests_in_this_process(candidate: str) -> None:
    """Child process: swap the streams, run the tests, print one JSON line of outcomes."""
    import pytest

    req_cls, resp_cls = _COUNTED.get(candidate, CANDIDATES[candidate])
    http.RequestStream, http.ResponseStream = req_cls, resp_cls  # before the tests import them

    def created() -> int:
        return req_cls.created + resp_cls.created

    class Recorder:
        def __init__(self) -> None:
            self.outcomes: dict[str, list] = {}
            self._before = 0

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):  # a pytest hook
            self._before = created()
            yield
            entry = self.outcomes.get(item.nodeid)
            if entry is not None:
                entry[1] = created() > self._before

        def pytest_runtest_logreport(self, report) -> None:  # a pytest hook
            entry = self.outcomes.setdefault(report.nodeid, ["passed", False])
            if report.failed:
                entry[0] = "failed"
            elif report.skipped and entry[0] == "passed" and report.when != "teardown":
                entry[0] = "skipped"

    recorder = Recorder()
    with open(os.devnull, "w") as sink:
        real = sys.stdout
        sys.stdout = sink
        try:
            pytest.main(["-q", "-p", "no:cacheprovider", *[os.path.join(ROOT, f) for f in TEST_FILES]],
                        plugins=[recorder])
        finally:
            sys.stdout = real
    print(json.dumps(recorder.outcomes))


def run_tests() -> dict[str, dict[str, list]]:
    results = {}
    for candidate in CANDIDATES:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-tests", candidate],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{candidate}: test run failed\n{proc.stdout}\n{proc.stderr}")
        results[candidate] = json.loads(lines[-1])
    return results


def render_tests(results: dict[str, dict[str, list]]) -> str:
    lines = ["| candidate | tests that create a stream | pass | fail | skipped |",
             "| --- | ---: | ---: | ---: | ---: |"]
    failures: list[str] = []
    for candidate, outcomes in results.items():
        applying = {k: v for k, v in outcomes.items() if v[1]}
        count = collections.Counter(v[0] for v in applying.values())
        lines.append(f"| {candidate} | {len(applying)} | {count['passed']} | {count['failed']} | {count['skipped']} |")
        failed = sorted(k.split("::", 1)[1] for k, v in applying.items() if v[0] == "failed")
        if failed:
            failures.append(f"- {candidate} fails: " + ", ".join(failed))
    return "\n".join(lines + [""] + failures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget-ms", type=float, default=100, help="time per case and round, all candidates")
    ap.add_argument("--tests", action="store_true", help="also run the unit tests through each candidate")
    ap.add_argument("--child-tests", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_tests:
        _run_tests_in_this_process(args.child_tests)
        return
    start = time.perf_counter()
    times, wrong = measure(args.rounds, args.budget_ms)
    print(f"# HTTP/1.x framing per exchange, {time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} rounds, "
          f"Python {sys.version.split()[0]}, httptools {httptools.__version__}, h11 {h11.__version__}\n")
    print(render(times, wrong))
    if args.tests:
        print()
        print(render_tests(run_tests()))
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
