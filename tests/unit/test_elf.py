"""ELF/USDT parsing on real binaries: PostgreSQL from Debian and a test program built here."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from otel_ebpf.elf import ElfError, ElfInfo, elf_info, parse_arg
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
POSTGRES = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))


@pytest.mark.parametrize("spec, kind, size, reg, disp, index_reg, scale", [
    ("8@%rbx", "reg", 8, "bx", 0, "", 1),
    ("-4@%eax", "reg", -4, "ax", 0, "", 1),
    ("1@%sil", "reg", 1, "si", 0, "", 1),
    ("8@%r12", "reg", 8, "r12", 0, "", 1),
    ("-4@%r9d", "reg", -4, "r9", 0, "", 1),
    ("-4@-144(%rbp)", "mem", -4, "bp", -144, "", 1),
    ("8@16(%rax)", "mem", 8, "ax", 16, "", 1),
    ("8@(%rax)", "mem", 8, "ax", 0, "", 1),
    ("8@(%rax,%rdx,8)", "mem", 8, "ax", 0, "dx", 8),
    ("4@-8(%rsp,%rcx,4)", "mem", 4, "sp", -8, "cx", 4),
    ("4@$5", "const", 4, "", 5, "", 1),
    ("-8@$-1", "const", -8, "", -1, "", 1),
    ("8@0x10(%rdi)", "mem", 8, "di", 16, "", 1),
])
def test_parse_arg(spec, kind, size, reg, disp, index_reg, scale):
    arg = parse_arg(spec)
    assert (arg.kind, arg.size, arg.reg, arg.disp, arg.index_reg, arg.scale) == (kind, size, reg, disp, index_reg, scale)


def test_parse_rip_relative_and_errors():
    arg = parse_arg("4@counter+8(%rip)")
    assert arg.kind == "rip" and arg.symbol == "counter" and arg.disp == 8
    assert "ctx->ip - 4096ULL + 8200ULL" in arg.c_expr(4096, 8192)
    for bad in ("3@%rax", "8@%xmm0", "8@$abc", "8@*garbage"):
        with pytest.raises(ElfError):
            parse_arg(bad)


def test_c_expressions():
    assert parse_arg("8@%rbx").c_expr(0) == "((u64)(u64)(u64)ctx->bx)"
    expr = parse_arg("-4@-144(%rbp)").c_expr(0)
    assert "bpf_probe_read_user(&__v, sizeof(__v), (void *)(ctx->bp + (-144LL)))" in expr
    assert "s32 __v" in expr and "(s64)(s32)__v" in expr
    assert parse_arg("4@$5").c_expr(0) == "((u64)(5LL))"


def readelf_notes(path: str) -> list[dict]:
    """What binutils says, to hold our parser against."""
    out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True, check=True).stdout
    notes = []
    for m in re.finditer(r"Provider: (\S+)\s+Name: (\S+)\s+Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), "
                         r"Semaphore: (0x[0-9a-f]+)\s+Arguments: ?([^\n]*)", out):
        notes.append({"provider": m[1], "name": m[2], "pc": int(m[3], 16), "semaphore": int(m[5], 16),
                      "args": m[6].strip()})
    return notes


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL not installed")
def test_postgres_notes_match_readelf():
    require(shutil.which("readelf") is not None, "readelf (binutils) is not installed")
    path = POSTGRES[-1]
    info = elf_info(path)
    expected = readelf_notes(path)
    assert len(info.probes) == len(expected) > 50
    ours = {(p.provider, p.name, p.pc): p for p in info.probes}
    for note in expected:
        p = ours[(note["provider"], note["name"], note["pc"])]
        assert p.semaphore == note["semaphore"] and p.arg_string == note["args"]
        if p.semaphore:  # PostgreSQL's semaphores live in .probes, a file-backed data segment
            assert p.semaphore_offset == info.vaddr_to_offset(p.semaphore)
    start = info.usdt("postgresql", "query__start")
    assert len(start) == 1 and start[0].semaphore and len(start[0].args) == 1 and start[0].args[0].size == 8
    assert info.symbol("errcode") is not None and info.symbol("PostmasterPid") is not None


@pytest.fixture(scope="module")
def test_program(tmp_path_factory):
    require(shutil.which("cc") is not None, "a C compiler (gcc) is not installed")
    require(os.path.exists("/usr/include/x86_64-linux-gnu/sys/sdt.h") or os.path.exists("/usr/include/sys/sdt.h"),
            "sys/sdt.h is missing: apt-get install systemtap-sdt-dev")
    out = tmp_path_factory.mktemp("sdt") / "sdt_test_program"
    subprocess.run(["cc", "-O2", "-o", str(out), str(REPO / "usdt/sdt_test_program.c"),
                    str(REPO / "usdt/sdt_test_tick.c")], check=True)
    return str(out)


def test_test_program_notes_and_semaphores(test_program):
    info = ElfInfo(test_program)
    expected = readelf_notes(test_program)
    names = sorted(p.name for p in info.probes)
    assert names == sorted(n["name"] for n in expected) == ["query__done", "query__start", "tick"]
    start = info.usdt("otel_test", "query__start")[0]
    sym = info.symbol("otel_test_query__start_semaphore")
    assert sym is not None and start.semaphore == sym.vaddr
    assert start.semaphore_offset == info.vaddr_to_offset(sym.vaddr)
    with open(test_program, "rb") as fh:  # the semaphore's file bytes are the zero it starts at
        fh.seek(start.semaphore_offset)
        assert fh.read(2) == b"\0\0"
    assert len(start.args) == 3 and start.args[0].size == 8
    tick = info.usdt("otel_test", "tick")[0]
    assert tick.semaphore == 0 and tick.semaphore_offset == 0
    assert tick.args[0].kind == "const" and tick.args[0].disp == 42
    # the probe site's file offset holds the nop gcc put there for the uprobe
    with open(test_program, "rb") as fh:
        fh.seek(start.file_offset)
        assert fh.read(1) == b"\x90"
    macro = info.usdt_arg_macro("otel_test", "query__start", 1)
    assert macro.startswith("(") and "ctx->" in macro


def test_not_an_elf(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(ElfError):
        ElfInfo(str(bogus))
    with pytest.raises(ElfError):
        elf_info(str(tmp_path / "vanished"))
