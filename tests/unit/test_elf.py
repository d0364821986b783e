"""ELF/USDT parsing on real binaries (PostgreSQL, MariaDB, nginx, libssl from Debian, and a
test program built here) and on synthetic arm64 argument specs (no arm64 binary here)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from otel_ebpf import elf
from otel_ebpf.elf import ElfError, ElfInfo, elf_info, instruction_pointer_expr, parse_arg, parse_args
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
POSTGRES = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
# The binaries the agent reads at start; CI installs them all (require fails there when one is absent).
REAL_BINARIES = {
    "mariadbd": "/usr/sbin/mariadbd",
    "postgres": POSTGRES[-1] if POSTGRES else "/usr/lib/postgresql/15/bin/postgres",
    "nginx": "/usr/sbin/nginx",
    "libssl": "/usr/lib/x86_64-linux-gnu/libssl.so.3",
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """elf_info() must not write the host's /var/cache/otel-ebpf from a test."""
    monkeypatch.setenv("OTEL_EBPF_CACHE_DIR", str(tmp_path / "elf-cache"))


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


# --- bulk symbol tables against pyelftools' own iteration -------------------------------

@pytest.mark.parametrize("name", sorted(REAL_BINARIES))
def test_bulk_symbols_equal_pyelftools(name):
    path = REAL_BINARIES[name]
    require(os.path.exists(path), f"{path} ({name}) is not installed")
    with open(path, "rb") as fh:
        f = ELFFile(fh)
        bulk = elf._read_symbols(f)
        reference = elf._read_symbols_pyelftools(f)
        loads = tuple((s["p_vaddr"], s["p_filesz"], s["p_offset"])
                      for s in f.iter_segments() if s["p_type"] == "PT_LOAD")
        assert elf._load_segments(f) == loads and loads  # read without iter_segments()
    assert list(bulk.items()) == list(reference.items())  # same pairs, same (file) order
    assert len(bulk) > 100


def test_symbol_filter_and_precedence_on_a_synthetic_table():
    """Undefined, zero-valued and unnamed entries are left out; the first table read wins."""
    strtab = b"\0main\0undef\0zero\0dup\0"
    rows = [  # st_name, st_info, st_other, st_shndx, st_value, st_size
        (0, 0, 0, 0, 0, 0), (1, 0x12, 0, 14, 0x1139, 11), (6, 0x12, 0, 0, 0x2000, 0),
        (12, 0x11, 0, 24, 0, 4), (17, 0x11, 0, 0xFFF1, 0x4010, 8), (0, 0x3, 0, 14, 0x1000, 0),
    ]
    table = b"".join(struct.pack("<IBBHQQ", *r) for r in rows)
    first = elf.parse_symbol_table(table, strtab, 64, True)
    assert first == {"main": (0x1139, 11), "dup": (0x4010, 8)}  # SHN_ABS counts as defined
    later = struct.pack("<IBBHQQ", 17, 0x11, 0, 24, 0x9999, 1)
    assert elf.parse_symbol_table(later, strtab, 64, True, into=first)["dup"] == (0x4010, 8)


def test_symbols_of_32_bit_and_big_endian_tables():
    strtab = b"\0f\0g\0"
    # Elf32_Sym: st_name, st_value, st_size, st_info, st_other, st_shndx
    rows32 = [(1, 0x8048000, 16, 0x12, 0, 13), (3, 0, 0, 0x12, 0, 0)]
    table32 = b"".join(struct.pack("<IIIBBH", *r) for r in rows32)
    assert elf.parse_symbol_table(table32, strtab, 32, True) == {"f": (0x8048000, 16)}
    table64be = struct.pack(">IBBHQQ", 3, 0x12, 0, 5, 0x400000, 32)
    assert elf.parse_symbol_table(table64be, strtab, 64, False) == {"g": (0x400000, 32)}


@pytest.mark.parametrize("name", sorted(REAL_BINARIES))
def test_build_id_without_pyelftools(name):
    path = REAL_BINARIES[name]
    require(os.path.exists(path), f"{path} ({name}) is not installed")
    with open(path, "rb") as fh:
        assert elf.read_build_id(fh) == elf._build_id(ELFFile(fh)) is not None


def test_machine_and_refused_architectures(tmp_path):
    info = ElfInfo(sys.executable)
    assert info.machine == "x86_64" or info.machine == "aarch64"
    with open(sys.executable, "rb") as fh:
        image = bytearray(fh.read(1 << 16))
    image[18:20] = struct.pack("<H", 3)  # e_machine = EM_386
    i386 = tmp_path / "i386"
    i386.write_bytes(bytes(image))
    with pytest.raises(ElfError, match="not supported"):
        ElfInfo(str(i386))


# --- arm64 argument specs ----------------------------------------------------------------

@pytest.mark.parametrize("spec, kind, size, reg, disp, index_reg", [
    ("8@x0", "reg", 8, "regs[0]", 0, ""),
    ("-4@w1", "reg", -4, "regs[1]", 0, ""),
    ("8@x30", "reg", 8, "regs[30]", 0, ""),
    ("8@sp", "reg", 8, "sp", 0, ""),
    ("8@[sp, 16]", "mem", 8, "sp", 16, ""),
    ("4@[x19, -8]", "mem", 4, "regs[19]", -8, ""),
    ("4@[x19, #-8]", "mem", 4, "regs[19]", -8, ""),
    ("8@[x1]", "mem", 8, "regs[1]", 0, ""),
    ("-2@[x0, x1]", "mem", -2, "regs[0]", 0, "regs[1]"),
    ("8@[x29, 0x20]", "mem", 8, "regs[29]", 32, ""),
    ("-4@5", "const", -4, "", 5, ""),
    ("4@#5", "const", 4, "", 5, ""),
    ("-8@-1", "const", -8, "", -1, ""),
])
def test_parse_arm64_arg(spec, kind, size, reg, disp, index_reg):
    arg = parse_arg(spec, "aarch64")
    assert (arg.kind, arg.size, arg.reg, arg.disp, arg.index_reg, arg.machine) == \
        (kind, size, reg, disp, index_reg, "aarch64")


def test_arm64_errors():
    for bad in ("8@x31", "8@x32", "8@v0", "8@%rax", "3@x0", "8@[x0, lsl]", "8@[x0, 8]!", "8@=5"):
        with pytest.raises(ElfError):
            parse_arg(bad, "aarch64")
    with pytest.raises(ElfError, match="not supported"):
        parse_arg("8@r0", "arm")


def test_arm64_argument_string_keeps_memory_operands_whole():
    """gcc writes a space inside arm64 memory operands: the arguments are not split there."""
    args = parse_args("-4@[sp, 60] 8@x1 4@[x19, -8] -4@5", "aarch64")
    assert [a.spec for a in args] == ["-4@[sp, 60]", "8@x1", "4@[x19, -8]", "-4@5"]
    assert parse_args("  ", "aarch64") == ()


def test_arm64_c_expressions():
    assert parse_arg("8@x0", "aarch64").c_expr(0) == "((u64)(u64)(u64)ctx->regs[0])"
    assert parse_arg("-4@w1", "aarch64").c_expr(0) == "((u64)(s64)(s32)ctx->regs[1])"
    assert parse_arg("8@[sp, 16]", "aarch64").c_expr(0) == (
        "({ s64 __v = 0; bpf_probe_read_user(&__v, sizeof(__v), (void *)(ctx->sp + (16LL))); "
        "((u64)(u64)(u64)__v); })")
    assert "(void *)(ctx->regs[0] + (0LL) + ctx->regs[1] * 1)" in parse_arg("-2@[x0, x1]", "aarch64").c_expr(0)
    assert parse_arg("4@#5", "aarch64").c_expr(0) == "((u64)(5LL))"


def test_instruction_pointer_per_machine():
    assert instruction_pointer_expr("x86_64") == "ctx->ip"
    assert instruction_pointer_expr("aarch64") == "ctx->pc"
    with pytest.raises(ElfError):
        instruction_pointer_expr("riscv")


def test_x86_c_expressions_byte_for_byte():
    """The x86-64 output the probes are compiled with: unchanged by the arm64 parser."""
    assert parse_arg("-4@%eax").c_expr(0) == "((u64)(s64)(s32)ctx->ax)"
    assert parse_arg("8@(%rax,%rdx,8)").c_expr(0) == (
        "({ s64 __v = 0; bpf_probe_read_user(&__v, sizeof(__v), (void *)(ctx->ax + (0LL) + ctx->dx * 8)); "
        "((u64)(u64)(u64)__v); })")
    assert parse_arg("4@counter+8(%rip)").c_expr(4096, 8192) == (
        "({ s32 __v = 0; bpf_probe_read_user(&__v, sizeof(__v), (void *)(ctx->ip - 4096ULL + 8200ULL)); "
        "((u64)(u64)(u32)__v); })")


def _synthetic_info(machine: str, notes: list[tuple[int, str]]) -> ElfInfo:
    """An ElfInfo over made-up facts: one probe "p:q" at each (pc, args)."""
    facts = elf._Facts(machine=machine, is_pie=True, has_symtab=False, has_dwarf=False,
                       loads=((0, 0x100000, 0),), symbols={"counter": (0x8000, 4)},
                       notes=tuple(elf._Note("p", "q", pc, 0, a) for pc, a in notes))
    return ElfInfo("/synthetic", facts)


def test_arm64_usdt_macro_tells_sites_apart_by_pc():
    info = _synthetic_info("aarch64", [(0x1234, "8@x0 -4@[sp, 16]"), (0x5678, "8@x2 -4@[sp, 16]")])
    assert info.machine == "aarch64" and info.probes[0].args[1].reg == "sp"
    assert info.usdt_arg_macro("p", "q", 2) == parse_arg("-4@[sp, 16]", "aarch64").c_expr(0)
    assert info.usdt_arg_macro("p", "q", 1) == (
        "((ctx->pc & 0xfff) == 0x678 ? ((u64)(u64)(u64)ctx->regs[2]) : "
        "((ctx->pc & 0xfff) == 0x234 ? ((u64)(u64)(u64)ctx->regs[0]) : 0ULL))")
    x86 = _synthetic_info("x86_64", [(0x1234, "8@%rax"), (0x5678, "8@%rbx")])
    assert x86.usdt_arg_macro("p", "q", 1).startswith("((ctx->ip & 0xfff) == 0x678 ? ")
