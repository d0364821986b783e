"""Tests of the OpenSSL target's decoding: ring buffer records (as probes/openssl.c writes
them) to CLIENT/SERVER spans, per connection, with split calls, lost bytes and bounds."""
from __future__ import annotations

import os
import ssl  # noqa: F401 - maps libssl into this process, for extra_paths
import struct
import dataclasses

import pytest

from otel_ebpf import process
from otel_ebpf.config import Config
from otel_ebpf.elf import ElfError
from otel_ebpf.targets import openssl as target_module
from otel_ebpf.targets import registry
from otel_ebpf.targets.base import KIND_CLIENT, KIND_SERVER, DecodeContext
from otel_ebpf.targets.openssl import DIR_CLOSE, DIR_READ, DIR_WRITE, OpensslTarget

HEADER = struct.Struct("<QQQQQIIII16s")  # struct tls_head
EPOCH = 1_700_000_000 * 10**9
NO_SUCH_PID = 99_999_999  # above any pid_max: /proc has nothing, so the kernel's comm decides
CAPTURE = 4096


class Wire:
    """Records as the kernel writes them, for one process: offsets per connection and
    direction, a clock, the capture limit."""

    def __init__(self, pid: int = NO_SUCH_PID, comm: bytes = b"client"):
        self.pid = pid
        self.comm = comm
        self.now = 1_000_000
        self.offsets: dict[tuple[int, int], int] = {}

    def call(self, ssl_ptr: int, direction: int, data: bytes, *, length: int | None = None,
             duration: int = 1000, lose: bool = False) -> bytes | None:
        length = len(data) if length is None else length
        start, self.now = self.now, self.now + duration
        offset = self.offsets.get((ssl_ptr, direction), 0)
        self.offsets[(ssl_ptr, direction)] = offset + length
        captured = data[:min(length, CAPTURE)]
        raw = HEADER.pack(start, self.now, ssl_ptr, offset, length, self.pid, self.pid, direction,
                          len(captured), self.comm) + captured
        self.now += 1000
        return None if lose else raw

    def write(self, ssl_ptr: int, data: bytes, **kw) -> bytes | None:
        return self.call(ssl_ptr, DIR_WRITE, data, **kw)

    def read(self, ssl_ptr: int, data: bytes, **kw) -> bytes | None:
        return self.call(ssl_ptr, DIR_READ, data, **kw)

    def close(self, ssl_ptr: int) -> bytes:
        read_off = self.offsets.pop((ssl_ptr, DIR_READ), 0)
        write_off = self.offsets.pop((ssl_ptr, DIR_WRITE), 0)
        return HEADER.pack(self.now, self.now, ssl_ptr, read_off, write_off, self.pid, self.pid, DIR_CLOSE, 0,
                           self.comm)


def ctx(targets: tuple[str, ...] = ("openssl",)) -> DecodeContext:
    return DecodeContext(EPOCH, dataclasses.replace(Config(), targets=tuple(targets or ())))


def decode(target: OpensslTarget, records: list, context: DecodeContext | None = None) -> list:
    return list(target.decode([r for r in records if r is not None], context or ctx()))


def request(method: str = "GET", path: str = "/", host: str = "shop.example:8443", body: bytes = b"",
            extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: probe/2.0\r\n"
            f"Authorization: Bearer s3cr3t-authz\r\nCookie: sid=s3cr3t-cookie\r\n{length}{extra}\r\n").encode() + body


def response(status: int = 200, body: bytes = b"ok\n", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return f"HTTP/1.1 {status} X\r\nContent-Length: {size}\r\n\r\n".encode() + body


# --- CLIENT and SERVER spans -----------------------------------------------------------


def test_client_span_from_a_write_then_reads():
    t, w = OpensslTarget(), Wire()
    first = w.write(0xA0, request(path="/orders/7?token=s3cr3t-q&page=2"))
    raw = response(404, b"not found\n")
    spans = decode(t, [first, w.read(0xA0, raw[:10]), w.read(0xA0, raw[10:30]), w.read(0xA0, raw[30:])])
    (span,) = spans
    assert span.kind == KIND_CLIENT and span.name == "GET" and span.resource_pid == NO_SUCH_PID
    a = span.attributes
    assert a["http.request.method"] == "GET"
    assert a["http.response.status_code"] == 404
    assert a["url.full"] == "https://shop.example:8443/orders/7?token=REDACTED&page=REDACTED"
    assert a["url.path"] == "/orders/7"
    assert a["server.address"] == "shop.example" and a["server.port"] == 8443
    assert a["network.protocol.version"] == "1.1"
    assert span.error and a["error.type"] == "404", "a client's 4xx is an error"
    start, *_ = HEADER.unpack_from(first)
    assert span.start_ns == EPOCH + start, "a client span starts at its request write's entry"
    assert span.end_ns == EPOCH + w.now - 1000, "and ends when the last response byte was read"
    assert "s3cr3t" not in repr(a)


def test_server_span_from_reads_then_a_write():
    t, w = OpensslTarget(), Wire(comm=b"server")
    raw = request("POST", "/api/pay?card=s3cr3t-q", body=b'{"card": "s3cr3t-body"}')
    first = w.read(0xB0, raw[:7])
    records = [first, w.read(0xB0, raw[7:60]), w.read(0xB0, raw[60:]), w.write(0xB0, response(500, b"boom"))]
    (span,) = decode(t, records)
    assert span.kind == KIND_SERVER and span.name == "POST"
    a = span.attributes
    assert a["url.path"] == "/api/pay" and a["url.query"] == "card=REDACTED" and a["url.scheme"] == "https"
    assert a["http.response.status_code"] == 500 and a["error.type"] == "500" and span.error
    assert a["user_agent.original"] == "probe/2.0"
    assert "url.full" not in a
    _, end, *_ = HEADER.unpack_from(first)
    assert span.start_ns == EPOCH + end, "a server span starts when the request's first bytes were read"
    assert "s3cr3t" not in repr(a)


def test_server_4xx_is_not_an_error():
    t, w = OpensslTarget(), Wire()
    (span,) = decode(t, [w.read(1, request()), w.write(1, response(404))])
    assert not span.error and "error.type" not in span.attributes


def test_keep_alive_and_pipelining():
    t, w = OpensslTarget(), Wire()
    records = []
    for i in range(3):  # keep-alive: one exchange after another
        records += [w.write(7, request(path=f"/k{i}")), w.read(7, response(200 + i))]
    # pipelined: three requests in one write, responses coming back in odd pieces
    records.append(w.write(7, request(path="/p0") + request("HEAD", "/p1") + request(path="/p2")))
    stream = response(200, b"a" * 10) + response(200, b"", length=1_000_000) + response(503, b"x")
    records += [w.read(7, stream[:5]), w.read(7, stream[5:80]), w.read(7, stream[80:])]
    spans = decode(t, records)
    assert [(s.attributes["url.path"], s.attributes["http.response.status_code"]) for s in spans] == [
        ("/k0", 200), ("/k1", 201), ("/k2", 202), ("/p0", 200), ("/p1", 200), ("/p2", 503)]
    assert spans[4].attributes["http.request.method"] == "HEAD"


def test_one_megabyte_response_from_captured_prefixes():
    t, w = OpensslTarget(), Wire()
    mb = 1024 * 1024
    raw = response(200, b"", length=mb)
    records = [w.write(3, request(path="/big.bin"))]
    records.append(w.read(3, raw + b"z" * (16384 - len(raw)), length=16384))
    remaining = mb - (16384 - len(raw))
    while remaining:
        n = min(16384, remaining)
        records.append(w.read(3, b"z" * n))
        remaining -= n
    assert all(len(r) <= HEADER.size + CAPTURE for r in records)
    (span,) = decode(t, records)
    assert span.attributes["url.path"] == "/big.bin"
    assert span.end_ns == EPOCH + w.now - 1000
    # the connection is framed right after it
    (next_span,) = decode(t, [w.write(3, request(path="/after")), w.read(3, response())])
    assert next_span.attributes["url.path"] == "/after"


def test_interim_100_continue():
    t, w = OpensslTarget(), Wire()
    records = [w.write(5, request("PUT", "/up", extra="Expect: 100-continue\r\n")),
               w.read(5, b"HTTP/1.1 100 Continue\r\n\r\n"),
               w.write(5, b"0123456789", length=10),
               w.read(5, response(201))]
    (span,) = decode(t, records)
    assert span.attributes["http.response.status_code"] == 201


def test_unknown_method_is_other():
    t, w = OpensslTarget(), Wire()
    (span,) = decode(t, [w.read(6, request("PROPFIND", "/dav")), w.write(6, response(207))])
    assert span.name == "HTTP"
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PROPFIND"


# --- lost bytes, resync, connection ends -------------------------------------------------


def test_a_lost_record_inside_a_body_keeps_the_framing():
    t, w = OpensslTarget(), Wire()
    raw = response(200, b"y" * 50_000)
    records = [w.write(8, request()), w.read(8, raw[:20_000]), w.read(8, raw[20_000:40_000], lose=True),
               w.read(8, raw[40_000:])]
    (span,) = decode(t, records)
    assert t.stats["bytes.lost"] == 20_000


def test_lost_framing_ends_at_the_last_bytes_and_comes_back_at_the_next_request():
    t, w = OpensslTarget(), Wire()
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"4000\r\n" + b"c" * 0x4000 + b"\r\n"
               + b"4000\r\n" + b"c" * 0x4000 + b"\r\n0\r\n\r\n")
    records = [w.write(9, request(path="/stream"))]
    records.append(w.read(9, chunked[:10_000]))
    records.append(w.read(9, chunked[10_000:20_000], lose=True))  # the second chunk-size line is in here
    records.append(w.read(9, chunked[20_000:]))
    last_read_end = w.now - 1000
    records += [w.write(9, request(path="/next")), w.read(9, response(201))]
    spans = decode(t, records)
    assert [s.attributes["url.path"] for s in spans] == ["/stream", "/next"]
    assert spans[0].end_ns == EPOCH + last_read_end
    assert spans[1].attributes["http.response.status_code"] == 201
    assert t.stats["exchanges.framing_lost"] == 1


def test_body_until_close_ends_at_ssl_free():
    t, w = OpensslTarget(), Wire()
    records = [w.write(10, request()), w.read(10, b"HTTP/1.0 200 OK\r\n\r\nstreamed"), w.read(10, b"more")]
    last = w.now - 1000
    assert decode(t, records) == []
    (span,) = decode(t, [w.close(10)])
    assert span.end_ns == EPOCH + last and span.attributes["network.protocol.version"] == "1.0"


def test_a_reused_ssl_address_starts_a_fresh_connection():
    t, w = OpensslTarget(), Wire()
    decode(t, [w.write(11, request(path="/old"))])  # never answered; its free was lost
    w.offsets.clear()
    spans = decode(t, [w.write(11, request(path="/new")), w.read(11, response())])
    assert [s.attributes["url.path"] for s in spans] == ["/new"]
    assert t.stats["connections.restarted"] == 1 and t.stats["exchanges.unanswered"] == 1


def test_joining_mid_connection_waits_for_a_request():
    t, w = OpensslTarget(), Wire()
    records = [w.read(12, b"y" * 3000, length=9000),  # the tail of a response we did not see begin
               w.write(12, request(path="/seen")), w.read(12, response())]
    (span,) = decode(t, records)
    assert span.attributes["url.path"] == "/seen" and span.kind == KIND_CLIENT


def test_switching_protocols_ends_http():
    t, w = OpensslTarget(), Wire()
    records = [w.read(13, request(path="/ws", extra="Upgrade: websocket\r\nConnection: Upgrade\r\n")),
               w.write(13, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
               w.read(13, b"\x81\x85GET / HTTP/1.1\r\n\r\n"), w.write(13, b"\x81\x02hi")]
    (span,) = decode(t, records)
    assert span.attributes["http.response.status_code"] == 101
    assert t.stats["connections.upgraded"] == 1


# --- not HTTP/1.x ----------------------------------------------------------------------------


def test_http2_is_counted_and_ignored():
    t, w = OpensslTarget(), Wire()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"
    records = [w.write(14, preface), w.read(14, b"\x00\x00\x06\x04\x00\x00\x00\x00\x00"),
               w.write(14, b"\x00\x00\x20\x01\x05\x00\x00\x00\x01" + b"\x82" * 32)]
    assert decode(t, records) == []
    assert t.stats["connections.http2"] == 1 and t.stats["records.ignored"] == 2


def test_binary_protocol_is_ignored_after_a_while_never_a_crash():
    t, w = OpensslTarget(), Wire()
    records = []
    for i in range(target_module.MAX_UNRECOGNIZED + 10):
        records.append(w.write(15, bytes([i % 256]) * 40 + b"\x00\xff" * 10))
        records.append(w.read(15, b"\x17\x03\x03" + os.urandom(30)))
    assert decode(t, records) == []
    assert t.stats["connections.not_http"] == 1
    assert decode(t, [b"short"]) == [] and t.stats["records.malformed"] == 1


# --- who is skipped ------------------------------------------------------------------------


def test_nginx_processes_are_left_to_the_nginx_target(monkeypatch):
    monkeypatch.setattr(registry, "available", lambda: ["postgres", "nginx", "openssl"])
    nginx = Wire(comm=b"nginx")
    records = [nginx.read(16, request()), nginx.write(16, response())]
    assert decode(OpensslTarget(), records, ctx(("nginx", "openssl"))) == []
    assert decode(OpensslTarget(), records, ctx(())) == [], "no --targets: every target, nginx included"
    assert len(decode(OpensslTarget(), records, ctx(("openssl",)))) == 1, "nginx seen through libssl"


def test_the_agents_own_tls_is_never_traced():
    w = Wire(pid=os.getpid())
    assert decode(OpensslTarget(), [w.write(17, request()), w.read(17, response())]) == []


# --- bounds and expiry ---------------------------------------------------------------------


def test_connections_are_bounded(monkeypatch):
    monkeypatch.setattr(target_module, "MAX_CONNECTIONS", 50)
    t, w = OpensslTarget(), Wire()
    assert decode(t, [w.write(999, request(path="/first")), w.read(999, b"HTTP/1.0 200 OK\r\n\r\nbody")]) == []
    spans = decode(t, [w.write(1000 + i, request()) for i in range(80)])
    assert len(t._conns) == 50 and t.stats["connections.evicted"] == 31
    assert [s.attributes["url.path"] for s in spans] == ["/first"], "an evicted body-until-close ends there"
    assert t.stats["exchanges.unanswered"] == 30


def test_silent_bodies_until_close_end_idle_connections_expire_final_flush_ends_all():
    t, w = OpensslTarget(), Wire()
    decode(t, [w.write(20, request()), w.write(21, request()), w.read(21, b"HTTP/1.0 200 OK\r\n\r\nbody")])
    assert list(t.flush(w.now + 10**9, ctx())) == []
    (span,) = t.flush(w.now + target_module.UNTIL_CLOSE_IDLE_NS + 10**9, ctx())
    assert span.attributes["http.response.status_code"] == 200, "no close seen: ends after a silence"
    assert len(t._conns) == 2
    assert list(t.flush(w.now + target_module.IDLE_EXPIRY_NS + 10**9, ctx())) == []
    assert not t._conns and t.stats["exchanges.unanswered"] == 1
    decode(t, [w.write(22, request()), w.read(22, b"HTTP/1.0 200 OK\r\n\r\nbody")])
    (span,) = t.flush(w.now, ctx(), final=True)
    assert span.attributes["url.path"] == "/"


def test_metric_per_kind():
    t, w = OpensslTarget(), Wire()
    (client,) = decode(t, [w.write(30, request()), w.read(30, response())])
    (server,) = decode(t, [w.read(31, request()), w.write(31, response())])
    assert t.metric_of(client)[0] == "http.client.request.duration"
    assert "server.address" in t.metric_of(client)[1]
    assert t.metric_of(server) == ("http.server.request.duration", OpensslTarget.metric_attributes)


# --- where it attaches ------------------------------------------------------------------------


def libssl() -> str:
    paths = OpensslTarget().candidate_paths()
    if not paths:
        pytest.skip("no libssl.so.3 / libssl.so.1.1 on this machine")
    return paths[0]


def test_plan_attaches_entry_and_return_of_each_call():
    plan = OpensslTarget().plan(libssl(), Config())
    labels = [a.label for a in plan.attach]
    for fn in ("SSL_read", "SSL_write"):
        assert f"{fn}()" in labels and f"{fn}() return" in labels
    assert "SSL_free()" in labels
    assert all(a.retprobe == a.label.endswith("return") for a in plan.attach)
    assert "-DCAPTURE_MAX=4096" in plan.cflags
    assert "-DCAPTURE_MAX=8192" in OpensslTarget().plan(libssl(), dataclasses.replace(Config(), tls_capture_bytes=8192)).cflags
    assert "-DCAPTURE_MAX=4096" in OpensslTarget().plan(libssl(), dataclasses.replace(Config(), tls_capture_bytes=1000)).cflags


def test_plan_refuses_a_library_without_ssl_read():
    with pytest.raises(ElfError):
        OpensslTarget().plan("/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true", Config())
    assert not OpensslTarget().inspect("/usr/bin/true").usable


def test_extra_paths_finds_the_libssl_this_process_maps():
    libssl()
    me = process.proc_info(os.getpid())
    paths = OpensslTarget().extra_paths([me])
    assert any(os.path.basename(p) in ("libssl.so.3", "libssl.so.1.1") for p in paths)
    assert all("libssl3.so" not in p for p in paths)
    assert process.FileId.of(libssl()) in {process.FileId.of(p) for p in paths}, "the same file, by identity"


@pytest.mark.parametrize("host,expected", [
    ("shop.example:8443", ("shop.example", 8443)), ("shop.example", ("shop.example", None)),
    ("[::1]:8443", ("::1", 8443)), ("[::1]", ("::1", None)), ("h:99999", ("h", None)), (None, (None, None)),
])
def test_split_host(host, expected):
    assert target_module.split_host(host) == expected
