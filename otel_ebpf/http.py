"""Incremental HTTP/1.x framing: where messages begin and end in a byte stream.

One parser follows one direction of one connection (`RequestStream` for the side
that carries requests, `ResponseStream` for the other). It is fed the bytes of
each read or write call as they come, split anywhere, and reports events:

    ("begin", None)        the first byte of a new message
    ("head", head)         its request/status line and headers are complete
    ("end", head)          its body is complete (Content-Length, chunked, or none)
    ("error", reason)      not HTTP/1.x we can follow; the parser stops until reset()

Bodies are never kept: they are only counted, so a call's data may be a
captured prefix of a longer call (`feed(prefix, length)`): the bytes after the
prefix are counted as body when the framing says they are body, and lose the
framing ("lost") when they may hold the next message's head.

Only what a span needs is read from the headers (Host, User-Agent,
Content-Length, Transfer-Encoding, Connection, traceparent, tracestate): every other
header, such as Authorization or Cookie, is skipped without being decoded or stored.

Pure Python, no imports from this project.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

# A head (start line + headers) longer than this is not something we follow (servers
# refuse at 8-16 KiB); bounding it bounds the memory per connection.
MAX_HEAD_BYTES = 16 * 1024
# A chunk-size line with its extensions; also the bound for each trailer field.
MAX_CHUNK_LINE = 1024

BEGIN, HEAD, END, ERROR = "begin", "head", "end", "error"
Event = tuple[str, object]

# Error reasons (callers count them).
ERR_HTTP2 = "http2"  # the HTTP/2 connection preface
ERR_NOT_HTTP = "not_http"  # bytes that do not start an HTTP/1.x message
ERR_HEAD_TOO_LARGE = "head_too_large"
ERR_BAD_HEAD = "bad_head"  # a malformed start line, header or Content-Length
ERR_BAD_CHUNK = "bad_chunk"
ERR_LOST = "lost"  # bytes we did not see where the next message's framing lives

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\s]+) HTTP/(1\.[0-9])\r?")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[0-9]) ([0-9]{3})(?: [^\r\n]*)?\r?")
_HEAD_END = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS_PREFIX = b"HTTP/1."
# The longest method token we wait for before calling a stream "not HTTP".
_MAX_METHOD_LEN = 32


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # the request-target as sent: "/path?query", "*", or an absolute URI
    version: str  # "1.1", "1.0"
    host: str | None = None
    user_agent: str | None = None
    content_length: int | None = None
    chunked: bool = False
    other_coding: bool = False  # a Transfer-Encoding other than a final "chunked"
    connection_close: bool = False
    traceparent: str | None = None  # W3C trace context; "" when sent more than once (invalid)
    tracestate: str | None = None


@dataclass(slots=True)
class ResponseHead:
    version: str
    status: int
    content_length: int | None = None
    chunked: bool = False
    other_coding: bool = False
    connection_close: bool = False
    request_method: str | None = None  # of the request this answers, when known

    @property
    def interim(self) -> bool:
        """1xx other than 101: another response to the same request follows."""
        return 100 <= self.status < 200 and self.status != 101


# --- parser states ----------------------------------------------------------------
_IDLE, _HEAD, _BODY, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _TUNNEL, _ERROR = range(10)


class _Stream:
    """Framing shared by requests and responses; subclasses parse heads and pick body framing."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start over at a message boundary (after an error, or a new connection)."""
        self._state = _IDLE
        self._buf = bytearray()
        self._remaining = 0
        self._head: RequestHead | ResponseHead | None = None
        self.error: str | None = None

    # Public view of the state, for callers deciding when to end a message themselves.
    @property
    def failed(self) -> bool:
        return self._state == _ERROR

    @property
    def until_close(self) -> bool:
        """The current message's body runs until the connection closes."""
        return self._state == _UNTIL_CLOSE

    @property
    def tunnel(self) -> bool:
        """The connection switched protocols (101, CONNECT): nothing more to follow."""
        return self._state == _TUNNEL

    @property
    def idle(self) -> bool:
        """Between messages: the next byte begins a new one."""
        return self._state == _IDLE

    def close(self) -> list[Event]:
        """The connection closed: a body that runs until close ends here."""
        events: list[Event] = []
        if self._state == _UNTIL_CLOSE:
            self._end(events)
        return events

    def feed(self, data: bytes, length: int | None = None) -> list[Event]:
        """Bytes of one call: `data` is its first bytes, `length` how many it really moved."""
        events: list[Event] = []
        view = memoryview(data)
        pos, n = 0, len(data)
        while pos < n and self._state not in (_ERROR, _TUNNEL):
            pos = self._step(view, pos, events)
        unseen = (len(data) if length is None else length) - n
        if unseen > 0:
            self._skip(unseen, events)
        return events

    # --- one step over known bytes --------------------------------------------------

    def _step(self, data: memoryview, pos: int, events: list[Event]) -> int:
        state = self._state
        if state == _IDLE:
            if data[pos] in (0x0D, 0x0A):
                return pos + 1  # stray line ends between messages are ignored (RFC 9112 2.2)
            events.append((BEGIN, None))
            self._state = _HEAD
            return pos
        if state == _HEAD:
            return self._step_head(data, pos, events)
        if state in (_BODY, _CHUNK_DATA):
            # _count, inlined: the hot path (every call inside a body) saves a method call
            take = min(self._remaining, len(data) - pos)
            self._remaining -= take
            if self._remaining == 0:
                self._part_done(events)
            return pos + take
        if state == _CHUNK_LINE:
            return self._step_chunk_line(data, pos, events)
        if state == _CHUNK_CRLF:
            return self._step_chunk_crlf(data, pos, events)
        if state == _TRAILERS:
            return self._step_trailers(data, pos, events)
        return len(data)  # _UNTIL_CLOSE: everything is body

    def _buffer_block(self, data: memoryview, pos: int) -> tuple[bytes, int] | None:
        """Buffer a head or trailers up to the empty line that ends it: (its bytes, the
        position in data after it), or None while it is incomplete (all of data buffered)."""
        before = len(self._buf)
        self._buf += data[pos:]
        m = _HEAD_END.search(self._buf, max(0, before - 2))  # the line end may straddle calls
        if m is None:
            return None
        block = bytes(self._buf[:m.end()])
        self._buf = bytearray()
        return block, pos + m.end() - before

    def _step_head(self, data: memoryview, pos: int, events: list[Event]) -> int:
        taken = self._buffer_block(data, pos)
        if taken is None:
            reason = self._check_partial(self._buf)
            if reason is None and len(self._buf) > MAX_HEAD_BYTES:
                reason = ERR_HEAD_TOO_LARGE
            if reason:
                self._fail(reason, events)
            return len(data)
        head_bytes, after = taken
        head = self._parse_head(head_bytes)
        if isinstance(head, str):
            self._fail(head, events)
            return len(data)
        self._head = head
        events.append((HEAD, head))
        self._start_body(head, events)
        return after

    def _step_chunk_line(self, data: memoryview, pos: int, events: list[Event]) -> int:
        end = bytes(data[pos:pos + MAX_CHUNK_LINE + 1]).find(b"\n")
        if end < 0:
            self._buf += data[pos:]
            if len(self._buf) > MAX_CHUNK_LINE:
                self._fail(ERR_BAD_CHUNK, events)
            return len(data)
        self._buf += data[pos:pos + end]
        line = bytes(self._buf).split(b";", 1)[0].strip()
        self._buf = bytearray()
        if not _CHUNK_SIZE.fullmatch(line):
            self._fail(ERR_BAD_CHUNK, events)
            return len(data)
        size = int(line, 16)
        if size == 0:
            self._state = _TRAILERS
            self._buf = bytearray(b"\n")  # the size line's LF: an empty line next ends the trailers
        else:
            self._state, self._remaining = _CHUNK_DATA, size
        return pos + end + 1

    def _step_chunk_crlf(self, data: memoryview, pos: int, events: list[Event]) -> int:
        byte = data[pos]
        if byte == 0x0D and self._remaining == 2:
            self._remaining = 1
            return pos + 1
        if byte == 0x0A:
            self._state = _CHUNK_LINE
            return pos + 1
        self._fail(ERR_BAD_CHUNK, events)
        return len(data)

    def _step_trailers(self, data: memoryview, pos: int, events: list[Event]) -> int:
        taken = self._buffer_block(data, pos)  # trailer fields are skipped, never read
        if taken is None:
            if len(self._buf) > MAX_HEAD_BYTES:
                self._fail(ERR_HEAD_TOO_LARGE, events)
            return len(data)
        self._end(events)
        return taken[1]

    # --- bytes we did not see ------------------------------------------------------

    def _skip(self, unseen: int, events: list[Event]) -> None:
        """Count `unseen` bytes that followed the known ones (body bytes, or framing lost)."""
        while unseen > 0 and self._state not in (_ERROR, _TUNNEL, _UNTIL_CLOSE):
            state = self._state
            if state in (_BODY, _CHUNK_DATA, _CHUNK_CRLF):
                unseen -= self._count(unseen, events)
            else:
                # A head, chunk-size line or trailer we cannot read: the framing is gone.
                if state == _IDLE:
                    events.append((BEGIN, None))
                self._fail(ERR_LOST, events)

    # --- message lifecycle -------------------------------------------------------------

    def _start_body(self, head: RequestHead | ResponseHead, events: list[Event]) -> None:
        mode = self._body_mode(head)
        if mode == "none":
            self._end(events)
        elif mode == "tunnel":
            self._end(events)
            self._state = _TUNNEL
        elif mode == "chunked":
            self._state = _CHUNK_LINE
        elif mode == "close":
            self._state = _UNTIL_CLOSE
        elif mode == "bad":
            self._fail(ERR_BAD_HEAD, events)
        else:
            length = head.content_length or 0
            if length == 0:
                self._end(events)
            else:
                self._state, self._remaining = _BODY, length

    def _count(self, available: int, events: list[Event]) -> int:
        """Take up to `available` bytes of the body, chunk data or chunk CRLF in progress
        (bytes seen or only counted: they are not looked at); how many it took."""
        take = min(self._remaining, available)
        self._remaining -= take
        if self._remaining == 0:
            self._part_done(events)
        return take

    def _part_done(self, events: list[Event]) -> None:
        if self._state == _BODY:
            self._end(events)
        elif self._state == _CHUNK_DATA:  # the data of one chunk: its CRLF follows
            self._state, self._remaining = _CHUNK_CRLF, 2
        else:  # the chunk's CRLF (counted, not seen): the next chunk-size line follows
            self._state = _CHUNK_LINE

    def _end(self, events: list[Event]) -> None:
        head = self._head
        events.append((END, head))
        self._state = _IDLE
        self._head = None
        self._message_done(head)

    def _fail(self, reason: str, events: list[Event]) -> None:
        self._state = _ERROR
        self._buf = bytearray()
        self.error = reason
        events.append((ERROR, reason))

    # --- subclass hooks -----------------------------------------------------------------

    def _check_partial(self, buf: bytearray) -> str | None:
        """An error reason as soon as an incomplete head cannot be HTTP/1.x (its start,
        or its first line once complete), so that garbage is not buffered."""
        raise NotImplementedError

    def _parse_head(self, raw: bytes) -> RequestHead | ResponseHead | str:
        """The parsed head, or an error reason."""
        raise NotImplementedError

    def _body_mode(self, head) -> str:
        """"none", "length", "chunked", "close", "tunnel" or "bad"."""
        raise NotImplementedError

    def _message_done(self, head) -> None:
        pass


class RequestStream(_Stream):
    """The request side of a connection: what a client writes and a server reads."""

    def _check_partial(self, buf: bytearray) -> str | None:
        end = buf.find(b"\n")
        if end < 0:
            return request_start_problem(bytes(buf[:_MAX_METHOD_LEN + 16]))
        line = bytes(buf[:end])
        if _REQUEST_LINE.fullmatch(line):
            return None
        return ERR_HTTP2 if line.startswith(HTTP2_PREFACE[:14]) else ERR_NOT_HTTP

    def _parse_head(self, raw: bytes) -> RequestHead | str:
        line, fields = _split_head(raw)
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            return ERR_HTTP2 if raw.startswith(HTTP2_PREFACE[:16]) else ERR_NOT_HTTP
        head = RequestHead(method=m.group(1).decode("ascii"), target=m.group(2).decode("utf-8", "replace"),
                           version=m.group(3).decode("ascii"))
        problem = _read_fields(fields, head)
        return problem or head

    def _body_mode(self, head: RequestHead) -> str:
        if head.other_coding:
            return "bad"  # a server answers 400 and closes
        if head.chunked:
            return "chunked"
        return "length"


class ResponseStream(_Stream):
    """The response side: framing depends on the request (HEAD, CONNECT), so
    `expect(method)` is told each request's method, in order."""

    def __init__(self) -> None:
        self._methods: deque[str] = deque()
        super().__init__()

    def expect(self, method: str) -> None:
        self._methods.append(method)

    def forget_expected(self) -> None:
        self._methods.clear()

    def _check_partial(self, buf: bytearray) -> str | None:
        end = buf.find(b"\n")
        if end < 0:
            prefix = bytes(buf[:len(_STATUS_PREFIX)])
            return None if _STATUS_PREFIX.startswith(prefix) else ERR_NOT_HTTP
        return None if _STATUS_LINE.fullmatch(bytes(buf[:end])) else ERR_NOT_HTTP

    def _parse_head(self, raw: bytes) -> ResponseHead | str:
        line, fields = _split_head(raw)
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            return ERR_NOT_HTTP
        head = ResponseHead(version=m.group(1).decode("ascii"), status=int(m.group(2)))
        head.request_method = self._methods[0] if self._methods else None
        problem = _read_fields(fields, head)
        return problem or head

    def _body_mode(self, head: ResponseHead) -> str:
        status, method = head.status, head.request_method
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            return "tunnel"
        if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
            return "none"
        if head.chunked:
            return "chunked"
        if head.other_coding or head.content_length is None:
            return "close"
        return "length"

    def _message_done(self, head: ResponseHead | None) -> None:
        if head is not None and not head.interim and self._methods:
            self._methods.popleft()


# --- helpers ---------------------------------------------------------------------------


def request_start_problem(start: bytes) -> str | None:
    """Why bytes that begin a stream cannot begin an HTTP/1.x request (None: they may)."""
    if not start:
        return None
    preface = HTTP2_PREFACE[:len(start)]
    if start[:len(preface)] == preface and len(start) >= 4:
        return ERR_HTTP2 if len(start) >= 16 else None
    space = start.find(b" ")
    token = start if space < 0 else start[:space]
    if any(c not in _TOKEN_CHARS for c in token):
        return ERR_NOT_HTTP
    if space < 0 and len(token) > _MAX_METHOD_LEN:
        return ERR_NOT_HTTP
    if space == 0:
        return ERR_NOT_HTTP
    return None


def looks_like_request_start(data: bytes) -> bool:
    """Whether a call's bytes may be the beginning of an HTTP/1.x request."""
    return bool(data) and request_start_problem(data[:_MAX_METHOD_LEN + 16]) is None


def _split_head(raw: bytes) -> tuple[bytes, list[bytes]]:
    lines = raw.split(b"\n")
    return lines[0], lines[1:]


def _read_fields(lines: list[bytes], head: RequestHead | ResponseHead) -> str | None:
    """Fill the few fields we use; None, or an error reason for a malformed head."""
    lengths: set[int] = set()
    codings: list[bytes] = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line or line[0] in (0x20, 0x09):
            continue  # the final empty line, or an obsolete folded continuation
        name, sep, value = line.partition(b":")
        if not sep or not name:
            return ERR_BAD_HEAD
        name = name.strip().lower()
        # Only these names are looked at; every other header is never decoded or kept.
        if name == b"content-length":
            for part in value.split(b","):
                part = part.strip()
                if not part.isdigit() or len(part) > 18:
                    return ERR_BAD_HEAD
                lengths.add(int(part))
        elif name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
        elif name == b"connection":
            if b"close" in [t.strip().lower() for t in value.split(b",")]:
                head.connection_close = True
        elif name == b"host" and isinstance(head, RequestHead):
            head.host = value.strip().decode("utf-8", "replace")
        elif name == b"user-agent" and isinstance(head, RequestHead):
            head.user_agent = value.strip().decode("utf-8", "replace")
        elif name == b"traceparent" and isinstance(head, RequestHead):
            # Two traceparent headers make the context invalid (W3C trace context).
            head.traceparent = "" if head.traceparent is not None else value.strip().decode("ascii", "replace")
        elif name == b"tracestate" and isinstance(head, RequestHead):
            text = value.strip().decode("ascii", "replace")
            head.tracestate = text if head.tracestate is None else f"{head.tracestate},{text}"
    if len(lengths) > 1:
        return ERR_BAD_HEAD
    if codings:
        head.chunked = codings[-1] == b"chunked"
        head.other_coding = not head.chunked
    elif lengths:
        head.content_length = lengths.pop()
    return None


def split_target(target: str) -> tuple[str, str | None]:
    """(path, query) of a request-target; an absolute URI loses its scheme and authority."""
    if "://" in target[:16]:
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    target = target.split("#", 1)[0]
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def redact_query(query: str) -> str:
    """Keep parameter names, replace every value with REDACTED: query strings carry tokens
    (the replacement the URL semantic conventions use)."""
    parts = []
    for item in query.split("&"):
        name, sep, value = item.partition("=")
        parts.append(f"{name}=REDACTED" if sep and value else item)
    return "&".join(parts)


def url_query(query: str, capture_raw: bool = False) -> str:
    """url.query as every target exports it: values redacted unless raw capture is on."""
    return query if capture_raw else redact_query(query)
