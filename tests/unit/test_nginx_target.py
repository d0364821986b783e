"""The nginx target without a kernel: struct layouts (table, DWARF, regenerated from the
headers), the build identity of the installed nginx, and record decoding."""
from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from otel_ebpf.config import Config
from otel_ebpf.elf import ElfError
from otel_ebpf.targets import nginx as ngx
from otel_ebpf.targets.base import DecodeContext
from tests.support.prereq import require, require_binary

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "nginx_offsets.sh"
NGINX_DEV = "/usr/share/nginx/src"
EPOCH_OFFSET = 1_700_000_000_000_000_000


def installed_nginx() -> str:
    return require_binary("nginx", "/usr/sbin/nginx")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> tuple[dict, str]:
    """tools/nginx_offsets.sh run against nginx-dev's headers: its entry and its -g object."""
    require(os.path.exists(f"{NGINX_DEV}/conf_flags"), "nginx-dev is not installed (apt-get install nginx-dev)")
    require_binary("cc")
    obj = str(tmp_path_factory.mktemp("nginx-offsets") / "offsets.o")
    run = subprocess.run(["sh", str(TOOL), "--object", obj], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return yaml.safe_load("builds:\n" + run.stdout)["builds"][0], obj


def record(*, start: int = 1_000, end: int = 2_000, wall_ms: int = 0, pid: int = 1, flags: int = 0,
           method: int = 0x2, version: int = 1001, status: int = 200, server_port: int = 8080, https: int = 0,
           client: bytes = b"", ua: bytes = b"", uri: bytes = b"", traceparent: bytes = b"") -> bytes:
    """A ring buffer record as probes/nginx.c writes it."""
    if traceparent:
        flags |= ngx.F_TRACEPARENT
    head = ngx.RECORD.struct.pack(start, end, wall_ms, pid, flags, method, version, status, server_port, https, 0,
                                  len(ua), len(uri), client.ljust(28, b"\0"), len(traceparent), traceparent)
    return head + ua + uri


def sockaddr_in(address: str, port: int) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(address)


def decode(raw: bytes, **config: object) -> list:
    return list(ngx.NginxTarget().decode([raw], DecodeContext(EPOCH_OFFSET, Config(**config))))


ALL = (ngx.F_METHOD | ngx.F_VERSION | ngx.F_STATUS | ngx.F_URI | ngx.F_CLIENT | ngx.F_SERVER | ngx.F_SCHEME
       | ngx.F_UA)


# --- the installed build -------------------------------------------------------------------


def test_build_identity_is_read_from_the_binary():
    path = installed_nginx()
    version, signature = ngx.build_identity(path)
    reported = subprocess.run([path, "-v"], capture_output=True, text=True).stderr.strip()
    assert reported.endswith(f"nginx/{version}")
    assert re.fullmatch(r"\d+,\d+,\d+,[01]{30,}", signature or "")


def test_installed_build_has_a_complete_layout():
    path = installed_nginx()
    layout = ngx.layout_for(path)
    assert layout.source, "the installed nginx is neither in usdt/nginx-offsets.yaml nor has DWARF"
    assert all(layout.groups().values()), layout.missing_notes()
    assert layout.missing_notes() == []


def test_table_entry_regenerates_from_the_headers(regenerated):
    entry, _ = regenerated
    version, signature = ngx.build_identity(installed_nginx())
    assert (entry["version"], entry["signature"]) == (version, signature), "nginx-dev does not match nginx"
    table = ngx.layout_from_table(version, signature)
    assert table is not None
    for section, members in ngx.MEMBERS.items():
        assert entry[section] == {m: table.offsets[(section, m)] for m in members}, section


def test_dwarf_reader_agrees_with_offsetof(regenerated):
    from otel_ebpf.elf import dwarf_member_offsets

    entry, obj = regenerated
    source, found = dwarf_member_offsets(obj, {ngx.STRUCT_TYPES[s]: m for s, m in ngx.MEMBERS.items()},
                                         cu_hint="offsets.c")
    assert source == obj
    assert found == {ngx.STRUCT_TYPES[s]: entry[s] for s in ngx.MEMBERS}
    layout = ngx.layout_from_dwarf(obj)
    assert layout is not None and layout.source == f"DWARF in {obj}" and all(layout.groups().values())


def test_dwarf_from_a_separate_debug_file(regenerated, tmp_path):
    """A stripped binary whose DWARF lives in a debug file next to it (.gnu_debuglink)."""
    from otel_ebpf.elf import debug_file_for

    entry, obj = regenerated
    objcopy = require_binary("objcopy")
    binary, debug = tmp_path / "nginx-like", tmp_path / "nginx-like.debug"
    subprocess.run([require_binary("cc"), obj, "-o", str(binary)], check=True)
    subprocess.run([objcopy, "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run([objcopy, "--strip-debug", f"--add-gnu-debuglink={debug}", str(binary)], check=True)
    assert debug_file_for(str(binary)) == str(debug)
    layout = ngx.layout_from_dwarf(str(binary))
    assert layout is not None and layout.source == f"DWARF in {debug}"
    assert layout.offsets == {(s, m): v for s in ngx.MEMBERS for m, v in entry[s].items()}


def test_stripped_nginx_has_no_dwarf():
    from otel_ebpf.elf import debug_file_for, dwarf_member_offsets

    path = installed_nginx()
    if debug_file_for(path) is None:  # no nginx debug package installed
        with pytest.raises(ElfError, match="no DWARF"):
            dwarf_member_offsets(path, {"ngx_http_request_t": ("method",)})


def test_plan_attaches_two_probes_at_the_exported_functions():
    path = installed_nginx()
    plan = ngx.NginxTarget().plan(path, Config())
    from otel_ebpf.elf import elf_info
    info = elf_info(path)
    assert [(a.fn_name, a.offset, a.retprobe) for a in plan.attach] == [
        ("on_request_start", info.symbol("ngx_http_process_request").file_offset, False),
        ("on_request_end", info.symbol("ngx_http_free_request").file_offset, False),
    ]
    assert all(f"-DHAVE_{g}=1" in plan.cflags for g in ngx.GROUPS)
    layout = ngx.layout_for(path)
    assert f"-DR_BLOCK={layout.offsets[('request', 'err_status')] + 8}" in plan.cflags  # the last member
    assert f"-DC_BLOCK={layout.offsets[('connection', 'local_sockaddr')] + 8}" in plan.cflags
    assert f"-DR_STATUS={ngx.layout_for(path).offsets[('request', 'headers_out.status')]}" in plan.cflags


# --- builds in neither the table nor DWARF -------------------------------------------------------


def test_unknown_build_gets_timing_only_and_doctor_says_so(tmp_path):
    fake = tmp_path / "nginx"
    shutil.copy("/bin/true", fake)
    with open(fake, "ab") as fh:
        fh.write(b"\0nginx/9.9.9\0" + b"8,4,8,0011111111010111001111111111111110\0")
    assert ngx.build_identity(str(fake)) == ("9.9.9", "8,4,8,0011111111010111001111111111111110")
    layout = ngx.layout_for(str(fake))
    assert layout.source == "" and not any(layout.groups().values())
    assert layout.cflags() == [f"-DHAVE_{g}=0" for g in ngx.GROUPS] + ["-DR_BLOCK=0", "-DC_BLOCK=0"]
    inspection = ngx.NginxTarget().inspect(str(fake))
    assert not inspection.usable  # /bin/true has no ngx_http_* functions
    notes = " ".join(inspection.notes)
    for _macros, gives in ngx.GROUPS.values():
        assert gives in notes
    with pytest.raises(ElfError, match="ngx_http_process_request"):
        ngx.NginxTarget().plan(str(fake), Config())


def test_partial_layout_drops_only_what_it_cannot_read():
    known = {ngx.MACROS[m] for m in ngx.MACROS if m != "R_ERR_STATUS"}
    layout = ngx.Layout("DWARF in test", {k: 8 * i for i, k in enumerate(sorted(known))})
    groups = layout.groups()
    assert groups["STATUS"] is False and all(ok for g, ok in groups.items() if g != "STATUS")
    flags = layout.cflags()
    assert "-DHAVE_STATUS=0" in flags and not any(f.startswith(("-DR_STATUS=", "-DC_SENT=")) for f in flags)
    assert any(f.startswith("-DR_CONNECTION=") for f in flags)  # the client address still needs it
    (note,) = layout.missing_notes()
    assert "http.response.status_code" in note and "url.path" not in note


def test_inspect_never_raises(tmp_path):
    text = tmp_path / "nginx"
    text.write_text("not an ELF file")
    for path in (str(text), str(tmp_path / "vanished")):
        inspection = ngx.NginxTarget().inspect(path)
        assert not inspection.usable and inspection.notes


# --- decoding -------------------------------------------------------------------------------------


def test_decode_full_record():
    raw = record(flags=ALL, status=200, client=sockaddr_in("10.1.2.3", 51000), ua=b"curl/8.0",
                 uri=b"/api/orders?id=42&token=s3cret&flag")
    (span,) = decode(raw)
    assert span.name == "GET" and span.kind == 2 and not span.error
    assert (span.start_ns, span.end_ns) == (EPOCH_OFFSET + 1_000, EPOCH_OFFSET + 2_000)
    assert span.attributes == {
        "http.request.method": "GET", "url.path": "/api/orders", "url.query": "id=REDACTED&token=REDACTED&flag",
        "url.scheme": "http", "http.response.status_code": 200, "network.protocol.version": "1.1",
        "server.port": 8080, "client.address": "10.1.2.3", "client.port": 51000,
        "user_agent.original": "curl/8.0",
    }


def test_cut_uri_keeps_the_path_and_drops_the_query():
    (span,) = decode(record(flags=ALL | ngx.F_URI_CUT, uri=b"/a?x=1&lon"))
    assert span.attributes["url.path"] == "/a" and "url.query" not in span.attributes


def test_decode_raw_query_when_asked():
    (span,) = decode(record(flags=ALL, uri=b"/a?x=1"), capture_raw_query=True)
    assert span.attributes["url.query"] == "x=1"


@pytest.mark.parametrize("status,error", [(200, False), (404, False), (499, False), (500, True), (503, True)])
def test_only_5xx_is_an_error(status, error):
    (span,) = decode(record(flags=ALL, status=status, uri=b"/"))
    assert span.error is error
    assert span.attributes.get("error.type") == (str(status) if error else None)


def test_methods_outside_the_conventions():
    (dav,) = decode(record(flags=ngx.F_METHOD, method=0x40))
    assert dav.name == "HTTP"
    assert dav.attributes == {"http.request.method": "_OTHER", "http.request.method_original": "MKCOL"}
    (unknown,) = decode(record(flags=ngx.F_METHOD, method=0x1))
    assert unknown.name == "HTTP" and unknown.attributes == {"http.request.method": "_OTHER"}


def test_timing_only_record():
    (span,) = decode(record(flags=0, client=sockaddr_in("10.0.0.1", 1), uri=b"/x", ua=b"u"))
    assert span.name == "HTTP" and span.attributes == {} and span.end_ns - span.start_ns == 1_000


def test_request_dated_by_nginx_clock():
    end_wall = EPOCH_OFFSET + 5_000_000
    (span,) = decode(record(start=0, end=5_000_000, wall_ms=(end_wall - 3_000_000) // 1_000_000,
                            flags=ngx.F_NGX_START | ngx.F_STATUS, status=400))
    assert span.start_ns == (end_wall - 3_000_000) // 1_000_000 * 1_000_000 and span.end_ns == end_wall


def test_bad_bytes_never_crash():
    target = ngx.NginxTarget()
    ctx = DecodeContext(EPOCH_OFFSET, Config())
    good = record(flags=ALL, uri=b"/caf\xe9\xff?\x00=\xfe", ua=b"\xff\xfe", client=b"\x99" * 28)
    spans = list(target.decode([b"short", good, b"", good[:-1]], ctx))
    assert target.malformed_records == 3 and len(spans) == 1
    assert spans[0].attributes["url.path"] == "/caf\ufffd\ufffd" and "client.address" not in spans[0].attributes


def test_ipv6_client():
    raw6 = struct.pack("<H", socket.AF_INET6) + struct.pack(">H", 443) + b"\0" * 4 \
        + socket.inet_pton(socket.AF_INET6, "2001:db8::7") + b"\0" * 4
    assert ngx.client_endpoint(raw6) == ("2001:db8::7", 443)


def test_hist_attributes_mirror_the_kernel_key():
    target = ngx.NginxTarget()
    dim = 0x8 << 32 | 2 << 24 | 4 << 16 | 503  # POST, https, HTTP/2, 503 (probes/nginx.c hist_dim)
    assert target.hist_attributes(dim) == {"http.request.method": "POST", "url.scheme": "https",
                                           "http.response.status_code": 503, "network.protocol.version": "2"}
    assert target.hist_attributes(0) == {}
    assert set(target.hist_attributes(0x40 << 32 | 1 << 24 | 3 << 16 | 207)) == set(target.metric_attributes)


@pytest.mark.parametrize("query,expected", [
    ("a=1&b=2", "a=REDACTED&b=REDACTED"), ("flag", "flag"), ("a=", "a="), ("", ""), ("x=1=2&&y", "x=REDACTED&&y"),
])
def test_url_query_keeps_names_and_redacts_values(query, expected):
    from otel_ebpf import http
    assert http.url_query(query) == expected
    assert http.url_query(query, capture_raw=True) == query


def test_resource_is_the_process_itself_without_an_nginx_parent():
    assert ngx.NginxTarget().resource_process(os.getpid()) == os.getpid()


def test_traceparent_header_makes_the_span_a_child():
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    (span,) = decode(record(flags=ALL, uri=b"/a", traceparent=tp))
    assert span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent_span_id.hex() == "00f067aa0ba902b7" and span.span_id and span.trace_flags == 1


@pytest.mark.parametrize("bad", [b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", b"zz-garbage",
                                 b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                                 b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", b"\xff" * 55])
def test_a_bad_traceparent_is_ignored(bad):
    (span,) = decode(record(flags=ALL, uri=b"/a", traceparent=bad))
    assert span.trace_id is None and span.parent_span_id == b""


def test_nginx_hash_of_header_names():
    assert ngx.nginx_hash("Host") == ngx.nginx_hash("host") == (((ord("h") * 31 + ord("o")) * 31 + ord("s")) * 31
                                                                 + ord("t"))
