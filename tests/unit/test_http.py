"""Tests of otel_ebpf.http: HTTP/1.x framing over bytes split anywhere."""
from __future__ import annotations

import random

import pytest

from otel_ebpf import http
from otel_ebpf.http import (
    BEGIN, END, ERROR, HEAD, HTTP2_PREFACE, RequestHead, RequestStream, ResponseHead, ResponseStream,
)

REQUEST_GET = (b"GET /orders?id=7&token=abc HTTP/1.1\r\nHost: shop.example:8443\r\n"
               b"User-Agent: probe/1.0\r\nAuthorization: Bearer s3cr3t-authz\r\n"
               b"Cookie: session=s3cr3t-cookie\r\n\r\n")
REQUEST_POST = (b"POST /cart HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 17\r\n"
                b"Content-Type: text/plain\r\n\r\nbody s3cr3t-body!")
RESPONSE_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
RESPONSE_CHUNKED = (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5;name=value;quoted=\"a;b\"\r\nhello\r\n"
                    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
                    b"0;last\r\nX-Checksum: 1234\r\nX-Other: y\r\n\r\n")


def summary(events: list[http.Event]) -> list[tuple]:
    """Events as plain tuples: kind plus what identifies the message."""
    out = []
    for kind, payload in events:
        if isinstance(payload, RequestHead):
            out.append((kind, payload.method, payload.target))
        elif isinstance(payload, ResponseHead):
            out.append((kind, payload.status))
        else:
            out.append((kind, payload))
    return out


def feed_split(parser, data: bytes, cuts: list[int]) -> list[http.Event]:
    events: list[http.Event] = []
    bounds = [0, *cuts, len(data)]
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(data[a:b])
    return events


def responses_expecting(*methods: str) -> ResponseStream:
    parser = ResponseStream()
    for m in methods:
        parser.expect(m)
    return parser


# --- whole messages ----------------------------------------------------------------------


def test_request_head_fields_and_nothing_else():
    events = RequestStream().feed(REQUEST_GET)
    assert summary(events) == [(BEGIN, None), (HEAD, "GET", "/orders?id=7&token=abc"),
                               (END, "GET", "/orders?id=7&token=abc")]
    head = events[1][1]
    assert (head.host, head.user_agent, head.version) == ("shop.example:8443", "probe/1.0", "1.1")
    assert "s3cr3t" not in repr(head), "Authorization and Cookie must never be kept"


def test_request_with_body_counts_it_without_keeping_it():
    parser = RequestStream()
    events = parser.feed(REQUEST_POST)
    assert summary(events) == [(BEGIN, None), (HEAD, "POST", "/cart"), (END, "POST", "/cart")]
    assert "s3cr3t" not in repr(events) and "s3cr3t" not in repr(vars(parser)), "a body is counted, never kept"
    assert parser.idle


def test_chunked_with_extensions_and_trailers():
    events = responses_expecting("GET").feed(RESPONSE_CHUNKED)
    assert summary(events) == [(BEGIN, None), (HEAD, 404), (END, 404)]


def test_chunked_request_body():
    body = b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    parser = RequestStream()
    assert summary(parser.feed(body + REQUEST_GET)) == [
        (BEGIN, None), (HEAD, "PUT", "/up"), (END, "PUT", "/up"),
        (BEGIN, None), (HEAD, "GET", "/orders?id=7&token=abc"), (END, "GET", "/orders?id=7&token=abc")]


def test_bare_lf_line_ends_are_accepted():
    data = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n"
    assert summary(responses_expecting("GET").feed(data)) == [(BEGIN, None), (HEAD, 200), (END, 200)]


# --- split anywhere ------------------------------------------------------------------------

PAIRS = [
    ("get", REQUEST_GET, RESPONSE_200),
    ("post", REQUEST_POST, RESPONSE_CHUNKED),
]


@pytest.mark.parametrize("name,request_bytes,response_bytes", PAIRS, ids=[p[0] for p in PAIRS])
def test_every_split_point_of_a_request_response_pair(name, request_bytes, response_bytes):
    method = request_bytes.split(b" ", 1)[0].decode()
    whole_request = summary(RequestStream().feed(request_bytes))
    whole_response = summary(responses_expecting(method).feed(response_bytes))
    for cut in range(1, len(request_bytes)):
        assert summary(feed_split(RequestStream(), request_bytes, [cut])) == whole_request, cut
    for cut in range(1, len(response_bytes)):
        assert summary(feed_split(responses_expecting(method), response_bytes, [cut])) == whole_response, cut


@pytest.mark.parametrize("name,request_bytes,response_bytes", PAIRS, ids=[p[0] for p in PAIRS])
def test_byte_by_byte(name, request_bytes, response_bytes):
    method = request_bytes.split(b" ", 1)[0].decode()
    assert summary(feed_split(RequestStream(), request_bytes, list(range(1, len(request_bytes))))) == \
        summary(RequestStream().feed(request_bytes))
    assert summary(feed_split(responses_expecting(method), response_bytes, list(range(1, len(response_bytes))))) == \
        summary(responses_expecting(method).feed(response_bytes))


def test_every_pair_of_split_points_keeps_keep_alive_messages_apart():
    stream = RESPONSE_200 + RESPONSE_CHUNKED + RESPONSE_200
    expected = summary(responses_expecting("GET", "GET", "GET").feed(stream))
    assert [e for e in expected if e[0] == END] == [(END, 200), (END, 404), (END, 200)]
    for a in range(1, len(stream), 7):
        for b in range(a + 1, len(stream), 5):
            assert summary(feed_split(responses_expecting("GET", "GET", "GET"), stream, [a, b])) == expected, (a, b)


# --- pipelining, HEAD, interim and bodiless responses ---------------------------------------


def test_pipelined_requests_in_one_call():
    events = RequestStream().feed(REQUEST_GET + b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n" + REQUEST_POST)
    assert [e for e in summary(events) if e[0] == HEAD] == [
        (HEAD, "GET", "/orders?id=7&token=abc"), (HEAD, "HEAD", "/big"), (HEAD, "POST", "/cart")]


def test_pipelined_responses_follow_their_requests_methods():
    head_response = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n"  # HEAD: no body follows
    stream = RESPONSE_200 + head_response + RESPONSE_CHUNKED
    events = responses_expecting("GET", "HEAD", "GET").feed(stream)
    assert [e for e in summary(events) if e[0] == END] == [(END, 200), (END, 200), (END, 404)]
    assert [p.request_method for k, p in events if k == END] == ["GET", "HEAD", "GET"]


def test_interim_100_continue_then_final_response():
    stream = b"HTTP/1.1 100 Continue\r\n\r\n" + RESPONSE_200 + RESPONSE_200
    parser = responses_expecting("POST", "GET")
    events = parser.feed(stream)
    finals = [p for k, p in events if k == END and not p.interim]
    assert [p.request_method for p in finals] == ["POST", "GET"]
    assert [p.status for k, p in events if k == END] == [100, 200, 200]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    stream = f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode() + RESPONSE_200
    events = responses_expecting("GET", "GET").feed(stream)
    assert [e for e in summary(events) if e[0] == END] == [(END, status), (END, 200)]


def test_body_until_close():
    parser = responses_expecting("GET")
    events = parser.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome body")
    assert summary(events) == [(BEGIN, None), (HEAD, 200)]
    assert parser.until_close
    assert summary(parser.feed(b"more body", 100_000)) == []
    assert summary(parser.close()) == [(END, 200)]


def test_switching_protocols_is_a_tunnel():
    parser = responses_expecting("GET")
    events = parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert summary(events) == [(BEGIN, None), (HEAD, 101), (END, 101)]
    assert parser.tunnel
    assert parser.feed(b"\x82\x00 anything") == []


@pytest.mark.parametrize("data", [
    b"FOO /x HTTP/1.1\r\nHost: h\r\n\r\n",  # any token is a method (RFC 9110 9.1); its span says _OTHER
    b"GET /x HTTP/1.1\r\n\r\n",  # no Host: the server answers 400, and that exchange is still a span
])
def test_requests_a_strict_parser_refuses_are_still_framed(data):
    """The agent watches, it does not judge: what reached the server gets its span
    (llhttp refuses methods outside its list, h11 an HTTP/1.1 request without Host)."""
    events = RequestStream().feed(data + REQUEST_GET)
    assert [e[0] for e in summary(events)] == [BEGIN, HEAD, END, BEGIN, HEAD, END]


def test_stray_line_ends_between_messages_are_ignored():
    events = RequestStream().feed(REQUEST_POST + b"\r\n" + REQUEST_GET)
    assert [e for e in summary(events) if e[0] == END] == [(END, "POST", "/cart"), (END, "GET", "/orders?id=7&token=abc")]


# --- captured prefixes and lost bytes ----------------------------------------------------------

MB = 1024 * 1024


def test_one_megabyte_response_as_captured_prefixes():
    """The kernel copies 4 KiB of each call; the lengths carry the framing."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n"
    stream_len = len(head) + MB
    parser = responses_expecting("GET", "GET")
    events: list[http.Event] = []
    pos = 0
    rng = random.Random(1)
    while pos < stream_len:
        call = min(rng.choice([16384, 16384, 8192, 1000, 33]), stream_len - pos)
        captured = (head + b"x" * 4096)[pos:pos + min(call, 4096)] if pos < len(head) else b"x" * min(call, 4096)
        events += parser.feed(captured, call)
        pos += call
    assert summary(events) == [(BEGIN, None), (HEAD, 200), (END, 200)]
    assert summary(parser.feed(RESPONSE_200)) == [(BEGIN, None), (HEAD, 200), (END, 200)]


def test_one_megabyte_chunked_response_in_many_chunks_and_calls():
    body = b"".join(b"%x\r\n" % 16384 + bytes([i % 256]) * 16384 + b"\r\n" for i in range(64)) + b"0\r\n\r\n"
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + RESPONSE_200
    rng = random.Random(2)
    cuts = sorted(set(rng.randrange(1, len(stream)) for _ in range(600)))
    events = feed_split(responses_expecting("GET", "GET"), stream, cuts)
    assert [e for e in summary(events) if e[0] == END] == [(END, 200), (END, 200)]


def test_uncaptured_bytes_inside_a_chunk_keep_the_framing():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
    stream = head + chunk + b"0\r\n\r\n"
    parser = responses_expecting("GET")
    captured = len(head) + 100
    covered = len(head) + len(b"10000\r\n") + 0x10000 + 1  # up to the middle of the chunk's CRLF
    events = parser.feed(stream[:captured], covered)
    events += parser.feed(stream[covered:])
    assert summary(events) == [(BEGIN, None), (HEAD, 200), (END, 200)]


def test_lost_bytes_where_a_head_lives_lose_the_framing():
    parser = responses_expecting("GET", "GET")
    stream = RESPONSE_200 + RESPONSE_200
    events = parser.feed(stream[:len(RESPONSE_200) + 3], len(stream))
    assert summary(events) == [(BEGIN, None), (HEAD, 200), (END, 200), (BEGIN, None), (ERROR, http.ERR_LOST)]
    assert parser.failed
    parser.reset()
    assert summary(parser.feed(RESPONSE_200)) == [(BEGIN, None), (HEAD, 200), (END, 200)]


def test_lost_bytes_inside_a_body_keep_the_framing():
    parser = responses_expecting("GET", "GET")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    events = parser.feed(head)
    events += parser.feed(b"", 60000)  # a record the ring buffer lost
    events += parser.feed(b"z" * 40000 + RESPONSE_200)
    assert [e for e in summary(events) if e[0] == END] == [(END, 200), (END, 200)]


# --- not HTTP/1.x ----------------------------------------------------------------------


def test_http2_preface_is_recognized_whole_or_split():
    assert summary(RequestStream().feed(HTTP2_PREFACE)) == [(BEGIN, None), (ERROR, http.ERR_HTTP2)]
    for cut in range(1, len(HTTP2_PREFACE)):
        events = feed_split(RequestStream(), HTTP2_PREFACE + b"\x00\x00\x12\x04\x00", [cut])
        assert (ERROR, http.ERR_HTTP2) in summary(events), cut


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS record
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"EHLO mail.example.com\r\n",  # SMTP: a token, a space, but no HTTP version
    b"HTTP/1.1 200 OK\r\n\r\n",  # a response where a request should be
    b" GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET /\r\n\r\n",  # HTTP/0.9
])
def test_garbage_on_the_request_side(data):
    events = RequestStream().feed(data)
    assert summary(events)[-1] in ((ERROR, http.ERR_NOT_HTTP), (ERROR, http.ERR_HTTP2))


@pytest.mark.parametrize("data", [
    b"\x00\x00\x12\x04\x00\x00\x00\x00\x00",  # an HTTP/2 SETTINGS frame
    b"GET / HTTP/1.1\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
])
def test_garbage_on_the_response_side(data):
    events = responses_expecting("GET").feed(data)
    assert summary(events)[-1][0] == ERROR


def test_request_with_unknown_transfer_coding_is_refused():
    events = RequestStream().feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert summary(events)[-1] == (ERROR, http.ERR_BAD_HEAD)


def test_heads_are_bounded():
    parser = RequestStream()
    events = parser.feed(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * http.MAX_HEAD_BYTES)
    assert summary(events)[-1] == (ERROR, http.ERR_HEAD_TOO_LARGE)


def test_random_bytes_never_raise():
    rng = random.Random(3)
    pieces = [REQUEST_GET, REQUEST_POST, RESPONSE_200, RESPONSE_CHUNKED, HTTP2_PREFACE, b"\r\n", b"0\r\n",
              b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"]
    for _ in range(400):
        blob = b"".join(rng.choice(pieces) if rng.random() < 0.6 else rng.randbytes(rng.randrange(1, 40))
                        for _ in range(rng.randrange(1, 8)))
        for parser in (RequestStream(), responses_expecting("GET", "HEAD")):
            cuts = sorted(set(rng.randrange(1, len(blob) + 1) for _ in range(rng.randrange(0, 5))))
            bounds = [0, *cuts, len(blob)]
            for a, b in zip(bounds, bounds[1:]):
                for kind, _ in parser.feed(blob[a:b], (b - a) + rng.choice([0, 0, 0, 5])):
                    assert kind in (BEGIN, HEAD, END, ERROR)
                if parser.failed:
                    parser.reset()


# --- helpers --------------------------------------------------------------------------


@pytest.mark.parametrize("target,expected", [
    ("/a/b?x=1&y=2", ("/a/b", "x=1&y=2")),
    ("/a/b", ("/a/b", None)),
    ("/a?", ("/a", "")),
    ("https://shop.example:8443/p?q=1", ("/p", "q=1")),
    ("http://shop.example", ("/", None)),
    ("*", ("*", None)),
    ("/a#frag", ("/a", None)),
])
def test_split_target(target, expected):
    assert http.split_target(target) == expected


def test_redact_query_keeps_names_only():
    assert http.redact_query("token=s3cr3t&page=2&flag&empty=") == "token=REDACTED&page=REDACTED&flag&empty="


def test_looks_like_request_start():
    assert http.looks_like_request_start(b"GET / HTTP/1.1\r\n")
    assert http.looks_like_request_start(b"GE")
    assert not http.looks_like_request_start(b"HTTP/1.1 200 OK")
    assert not http.looks_like_request_start(b"\x17\x03\x03")
    assert not http.looks_like_request_start(b"")
