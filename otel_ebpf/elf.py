"""ELF facts a probe needs: symbols, file offsets, USDT notes, struct layouts from DWARF.

The kernel attaches uprobes at *file offsets*, while symbols and USDT notes give
*virtual addresses*; every conversion goes through the PT_LOAD segment that
holds the address. USDT argument specs (x86-64 ``8@%rbx``, ``-4@-144(%rbp)``;
arm64 ``8@x0``, ``-4@[sp, 16]``) become C expressions over ``struct pt_regs *ctx``
that a probe's C file receives as ``-D`` macros (see ``ElfInfo.usdt_arg_macro``).

Reading a large binary costs (mariadbd: ~30k symbols) and the agent reads the same
binaries at every start, so what ``ElfInfo`` computes, and what ``dwarf_member_offsets``
finds, is kept in a persistent cache (see "Persistent cache" below). pyelftools reads
headers, sections and notes; symbol tables are unpacked in bulk with ``struct``, which
is ~25x faster than pyelftools' per-symbol parsing.
"""
from __future__ import annotations

import array
import functools
import json
import logging
import os
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from .cachestore import (  # noqa: F401 - re-exported: the ELF cache is this store
    CACHE_ENV, SYSTEM_CACHE_DIR, CACHE_MAX_BYTES, _MAGIC, _FORMAT_VERSION, _KIND_ELF, _KIND_DWARF, _KIND_NAMES, _HEADER, _DIGEST_SIZE, _MAX_KEY, _ENTRY_NAME_RE, _TMP_PREFIX, _STALE_TMP_SECONDS, _Unset, _UNSET, set_cache_dir, default_cache_dir, _resolve_cache_dir, _owned_and_private, _usable_dir, _entry_path, _pack_entry, _unpack_entry, _read_entry, _touch, _write_entry, _unlink_quietly, _evict, _store,
)

log = logging.getLogger(__name__)


class ElfError(Exception):
    """A binary that cannot be read or does not hold what a probe needs."""


# ElfInfo.machine values, and the names pyelftools' get_machine_arch() gives them.
X86_64 = "x86_64"
AARCH64 = "aarch64"
_MACHINES = {"x64": X86_64, "AArch64": AARCH64}


def instruction_pointer_expr(machine: str) -> str:
    """C for the instruction pointer in ``struct pt_regs *ctx`` (the kernel's field names)."""
    if machine == X86_64:
        return "ctx->ip"
    if machine == AARCH64:
        return "ctx->pc"  # arm64 pt_regs: regs[31], sp, pc, pstate
    raise ElfError(f"no instruction pointer known for machine {machine!r}")


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    vaddr: int
    size: int
    file_offset: int


@dataclass(frozen=True, slots=True)
class UsdtArg:
    """One USDT argument: where the compiler left it and how wide it is."""

    spec: str
    size: int  # bytes; negative = signed
    kind: str  # "reg" | "const" | "mem" | "rip"
    reg: str = ""  # a pt_regs field: "bx" on x86-64, "regs[3]" or "sp" on arm64
    index_reg: str = ""
    scale: int = 1
    disp: int = 0
    symbol: str = ""  # for rip-relative "sym(%rip)" (x86-64 only)
    machine: str = X86_64

    def c_expr(self, pc_vaddr: int, symbol_vaddr: int | None = None) -> str:
        """A C expression (type u64) that reads this argument in a uprobe at the probe site.

        ``pc_vaddr`` is the site's link-time address: with the instruction pointer it gives
        the load base of a PIE, needed only for ``%rip``-relative arguments.
        """
        width = abs(self.size)
        ctype = {1: "8", 2: "16", 4: "32", 8: "64"}.get(width)
        if ctype is None:
            raise ElfError(f"unsupported USDT argument width in {self.spec!r}")
        cast = f"(s64)(s{ctype})" if self.size < 0 else f"(u64)(u{ctype})"
        if self.kind == "const":
            return f"((u64)({self.disp}LL))"
        if self.kind == "reg":
            return f"((u64){cast}ctx->{self.reg})"
        if self.kind == "mem":
            addr = f"ctx->{self.reg} + ({self.disp}LL)"
            if self.index_reg:
                addr += f" + ctx->{self.index_reg} * {self.scale}"
        elif self.kind == "rip":
            if symbol_vaddr is None:
                raise ElfError(f"cannot resolve {self.symbol!r} for USDT argument {self.spec!r}")
            # PIE: runtime base = ip - pc_vaddr, so &sym = ip - pc_vaddr + sym_vaddr.
            ip = instruction_pointer_expr(self.machine)
            addr = f"{ip} - {pc_vaddr}ULL + {symbol_vaddr + self.disp}ULL"
        else:  # pragma: no cover - parse_arg never produces another kind
            raise ElfError(f"unknown argument kind {self.kind}")
        return (
            f"({{ s{ctype} __v = 0; bpf_probe_read_user(&__v, sizeof(__v), (void *)({addr})); "
            f"((u64){cast}__v); }})"
        )


@dataclass(frozen=True, slots=True)
class UsdtProbe:
    provider: str
    name: str
    pc: int  # link-time address of the probe site (after the .stapsdt.base fix-up)
    file_offset: int
    semaphore: int  # link-time address of the semaphore, 0 if none
    semaphore_offset: int  # file offset of the semaphore, 0 if none
    arg_string: str
    args: tuple[UsdtArg, ...]

    @property
    def full_name(self) -> str:
        return f"{self.provider}:{self.name}"


# --- USDT argument specs ---------------------------------------------------------------

# pt_regs field for every x86-64 register name gcc may use in an argument spec.
_REGS: dict[str, str] = {}
for _field, _names in {
    "ax": "rax eax ax al ah", "bx": "rbx ebx bx bl bh", "cx": "rcx ecx cx cl ch",
    "dx": "rdx edx dx dl dh", "si": "rsi esi si sil", "di": "rdi edi di dil",
    "bp": "rbp ebp bp bpl", "sp": "rsp esp sp spl", "ip": "rip eip ip",
}.items():
    for _n in _names.split():
        _REGS[_n] = _field
for _i in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        _REGS[f"r{_i}{_suffix}"] = f"r{_i}"

_ARG_RE = re.compile(r"^(-?\d+)@(.+)$")
_MEM_RE = re.compile(
    r"^(?P<disp>[-+]?(?:0x[0-9a-fA-F]+|\d+))?\((?P<base>%\w+)(?:,(?P<index>%\w+)(?:,(?P<scale>\d+))?)?\)$"
)
_RIP_RE = re.compile(r"^(?P<sym>[A-Za-z_.$][\w.$@]*)(?P<off>[-+]\d+)?\(%rip\)$")

# arm64, as gcc's sys/sdt.h operands print there: x0/w0 (64/32-bit views of one register),
# sp, [x19, -8] or [x19, #-8], [x1], [x0, x1], constants 5 or #5.
_A64_NUM = r"[-+]?(?:0x[0-9a-fA-F]+|\d+)"
_A64_CONST_RE = re.compile(rf"^#?(?P<value>{_A64_NUM})$")
_A64_MEM_RE = re.compile(
    rf"^\[\s*(?P<base>\w+)\s*(?:,\s*(?:#?(?P<disp>{_A64_NUM})|(?P<index>[a-z]\w*))\s*)?\]$"
)
_A64_GPR_RE = re.compile(r"^[xw]([12]?\d|30)$")
_A64_ALIASES = {"sp": "sp", "wsp": "sp", "fp": "regs[29]", "lr": "regs[30]"}
# An arm64 memory operand has a space after its comma: arguments cannot be split on blanks.
_A64_TOKEN_RE = re.compile(r"[^\s\[]*\[[^\]]*\]\S*|\S+")


def _reg(name: str, spec: str) -> str:
    field = _REGS.get(name.lstrip("%"))
    if field is None:
        raise ElfError(f"unknown register {name!r} in USDT argument {spec!r}")
    return field


def _a64_reg(name: str, spec: str) -> str:
    """The arm64 pt_regs field for a register name: xN and wN are both regs[N]."""
    m = _A64_GPR_RE.match(name)
    if m:
        return f"regs[{int(m.group(1))}]"
    field = _A64_ALIASES.get(name)
    if field is None:
        raise ElfError(f"unknown arm64 register {name!r} in USDT argument {spec!r}")
    return field


def _a64_int(text: str, spec: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise ElfError(f"bad number {text!r} in USDT argument {spec!r}") from exc


def _split_size(spec: str) -> tuple[int, str]:
    m = _ARG_RE.match(spec.strip())
    if m:
        size, operand = int(m.group(1)), m.group(2)
    else:  # very old notes have no size: assume a signed long
        size, operand = -8, spec.strip()
    if size == 0 or abs(size) not in (1, 2, 4, 8):
        raise ElfError(f"bad USDT argument size in {spec!r}")
    return size, operand


def _parse_x86_operand(spec: str, size: int, operand: str) -> UsdtArg:
    if operand.startswith("$"):
        value = operand[1:]
        try:
            return UsdtArg(spec, size, "const", disp=int(value, 0))
        except ValueError as exc:
            raise ElfError(f"non-numeric constant in USDT argument {spec!r}") from exc
    if operand.startswith("%"):
        return UsdtArg(spec, size, "reg", reg=_reg(operand, spec))
    rip = _RIP_RE.match(operand)
    if rip:
        return UsdtArg(spec, size, "rip", symbol=rip.group("sym"), disp=int(rip.group("off") or 0))
    mem = _MEM_RE.match(operand)
    if mem:
        base = mem.group("base")
        if base == "%rip":
            raise ElfError(f"rip-relative numeric USDT argument {spec!r} is not supported")
        return UsdtArg(
            spec, size, "mem",
            reg=_reg(base, spec),
            index_reg=_reg(mem.group("index"), spec) if mem.group("index") else "",
            scale=int(mem.group("scale") or 1),
            disp=int(mem.group("disp") or "0", 0),
        )
    raise ElfError(f"unsupported USDT argument {spec!r}")


def _parse_a64_operand(spec: str, size: int, operand: str) -> UsdtArg:
    const = _A64_CONST_RE.match(operand)
    if const:
        return UsdtArg(spec, size, "const", disp=_a64_int(const.group("value"), spec), machine=AARCH64)
    mem = _A64_MEM_RE.match(operand)
    if mem:
        index = mem.group("index")
        return UsdtArg(
            spec, size, "mem",
            reg=_a64_reg(mem.group("base"), spec),
            index_reg=_a64_reg(index, spec) if index else "",
            disp=_a64_int(mem.group("disp") or "0", spec),
            machine=AARCH64,
        )
    if re.fullmatch(r"[a-z]\w*", operand):
        return UsdtArg(spec, size, "reg", reg=_a64_reg(operand, spec), machine=AARCH64)
    raise ElfError(f"unsupported arm64 USDT argument {spec!r}")


def parse_arg(spec: str, machine: str = X86_64) -> UsdtArg:
    """Parse one argument spec as the compiler writes it in ``.note.stapsdt``."""
    size, operand = _split_size(spec)
    if machine == X86_64:
        return _parse_x86_operand(spec, size, operand)
    if machine == AARCH64:
        return _parse_a64_operand(spec, size, operand.strip())
    raise ElfError(f"USDT arguments of {machine!r} binaries are not supported")


def parse_args(arg_string: str, machine: str = X86_64) -> tuple[UsdtArg, ...]:
    if not arg_string.strip():
        return ()
    specs = _A64_TOKEN_RE.findall(arg_string) if machine == AARCH64 else arg_string.split()
    return tuple(parse_arg(a, machine) for a in specs)


# --- Symbol tables ---------------------------------------------------------------------

SHN_UNDEF = 0
# Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64.
# Elf32_Sym: st_name u32, st_value u32, st_size u32, st_info u8, st_other u8, st_shndx u16.
_SYM_FORMATS = {64: "IBBHQQ", 32: "IIIBBH"}


def _symbol_rows(table: bytes, elfclass: int, little_endian: bool) -> Iterator[tuple[int, int, int, int]]:
    """(st_name, st_shndx, st_value, st_size) of every entry, unpacked in one pass."""
    layout = struct.Struct(("<" if little_endian else ">") + _SYM_FORMATS[elfclass])
    table = table[:len(table) - len(table) % layout.size]  # as pyelftools: sh_size // entsize entries
    if elfclass == 64:
        return ((n, shndx, value, size) for n, _i, _o, shndx, value, size in layout.iter_unpack(table))
    return ((n, shndx, value, size) for n, value, size, _i, _o, shndx in layout.iter_unpack(table))


def parse_symbol_table(table: bytes, strtab: bytes, elfclass: int, little_endian: bool,
                       into: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
    """Defined, named symbols with an address: name -> (st_value, st_size).

    A name already in ``into`` keeps its entry, so a table read first (.symtab) wins.
    Names are decoded as pyelftools does (UTF-8, undecodable bytes replaced).
    """
    symbols: dict[str, tuple[int, int]] = {} if into is None else into
    for name_at, shndx, value, size in _symbol_rows(table, elfclass, little_endian):
        if not value or shndx == SHN_UNDEF:
            continue
        end = strtab.find(b"\0", name_at)
        raw = strtab[name_at:end] if end >= 0 else strtab[name_at:]
        if raw:
            name = raw.decode("utf-8", "replace")
            if name not in symbols:
                symbols[name] = (value, size)
    return symbols


def _section_bytes(elf: ELFFile, section) -> bytes:
    # Raw bytes at sh_offset, as pyelftools' own symbol parsing reads them.
    elf.stream.seek(section["sh_offset"])
    return elf.stream.read(section["sh_size"])


def _symbol_sections(elf: ELFFile) -> Iterator[SymbolTableSection]:
    for name in (".symtab", ".dynsym"):  # .symtab first: it has local symbols too
        section = elf.get_section_by_name(name)
        if isinstance(section, SymbolTableSection):
            yield section


def _read_symbols(elf: ELFFile) -> dict[str, tuple[int, int]]:
    symbols: dict[str, tuple[int, int]] = {}
    entry_size = struct.calcsize("<" + _SYM_FORMATS[elf.elfclass])
    for section in _symbol_sections(elf):
        if section["sh_type"] == "SHT_NOBITS":
            continue  # a separate debug file's .dynsym: no bytes in this file
        if section["sh_entsize"] != entry_size:  # never seen; keep pyelftools' reading
            _add_symbols_pyelftools(section, symbols)
            continue
        parse_symbol_table(_section_bytes(elf, section), _section_bytes(elf, section.stringtable),
                           elf.elfclass, elf.little_endian, into=symbols)
    return symbols


def _add_symbols_pyelftools(section: SymbolTableSection, symbols: dict[str, tuple[int, int]]) -> None:
    for sym in section.iter_symbols():
        if sym["st_value"] and sym["st_shndx"] != "SHN_UNDEF" and sym.name:
            symbols.setdefault(sym.name, (sym["st_value"], sym["st_size"]))


def _read_symbols_pyelftools(elf: ELFFile) -> dict[str, tuple[int, int]]:
    """The per-symbol pyelftools reading: the reference the bulk reader is held against."""
    symbols: dict[str, tuple[int, int]] = {}
    for section in _symbol_sections(elf):
        _add_symbols_pyelftools(section, symbols)
    return symbols


# --- What ElfInfo reads from a binary --------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Note:
    """One raw .note.stapsdt entry; arguments are parsed when ElfInfo is built."""

    provider: str
    name: str
    pc: int
    semaphore: int
    arg_string: str


@dataclass(frozen=True, slots=True)
class _Facts:
    """Everything ElfInfo reads from a file: what the persistent cache stores."""

    machine: str
    is_pie: bool
    has_symtab: bool
    has_dwarf: bool
    loads: tuple[tuple[int, int, int], ...]  # PT_LOAD (p_vaddr, p_filesz, p_offset)
    symbols: Mapping[str, tuple[int, int]]  # name -> (st_value, st_size), in file order
    notes: tuple[_Note, ...]


class _SymbolMap(Mapping[str, tuple[int, int]]):
    """Symbols read back from the cache: name -> (st_value, st_size), in file order.

    The pairs are made on lookup: making 30k of them up front (new ints and tuples) cost
    more than everything else a cache hit does.
    """

    __slots__ = ("_index", "_values", "_sizes")

    def __init__(self, names: list[str], values: array.array, sizes: array.array):
        self._index = dict(zip(names, range(len(names))))
        self._values, self._sizes = values, sizes

    def __getitem__(self, name: str) -> tuple[int, int]:
        i = self._index[name]
        return self._values[i], self._sizes[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _read_usdt_notes(elf: ELFFile) -> tuple[_Note, ...]:
    notes = elf.get_section_by_name(".note.stapsdt")
    if not isinstance(notes, NoteSection):
        return ()
    base_section = elf.get_section_by_name(".stapsdt.base")
    actual_base = base_section["sh_addr"] if base_section is not None else None
    addr_size = elf.elfclass // 8
    fmt = "<QQQ" if addr_size == 8 else "<III"
    found: list[_Note] = []
    for note in notes.iter_notes():
        # pyelftools names type 3 after GNU notes (NT_GNU_BUILD_ID); the owner tells.
        if note["n_name"] != "stapsdt" or note["n_type"] not in (3, "NT_STAPSDT", "NT_GNU_BUILD_ID"):
            continue
        desc = note.get("n_descdata")
        if not isinstance(desc, bytes):
            continue
        pc, note_base, semaphore = struct.unpack_from(fmt, desc, 0)
        provider, name, arg_string = desc[3 * addr_size:].split(b"\0")[:3]
        if actual_base is not None and note_base:
            # prelink may have moved sections: shift by how far .stapsdt.base moved
            pc += actual_base - note_base
            if semaphore:
                semaphore += actual_base - note_base
        found.append(_Note(provider.decode("ascii", "replace"), name.decode("ascii", "replace"),
                           pc, semaphore, arg_string.decode("ascii", "replace")))
    return tuple(found)


def _load_segments(elf: ELFFile) -> tuple[tuple[int, int, int], ...]:
    """PT_LOAD (p_vaddr, p_filesz, p_offset). Read from the program headers directly:
    pyelftools' iter_segments() builds every section (a 30k-entry GNU hash table too)."""
    found = _program_headers(elf.stream)
    if found is None:
        return tuple((seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
                     for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
    return tuple((vaddr, filesz, offset) for p_type, offset, vaddr, filesz, _ in found[1] if p_type == _PT_LOAD)


def _read_facts(elf: ELFFile, path: str) -> _Facts:
    arch = elf.get_machine_arch()
    machine = _MACHINES.get(arch)
    if machine is None:
        raise ElfError(f"{path}: {arch} binaries are not supported (x86-64 and AArch64 only)")
    return _Facts(
        machine=machine,
        is_pie=elf.header["e_type"] == "ET_DYN",
        has_symtab=elf.get_section_by_name(".symtab") is not None,
        has_dwarf=elf.has_dwarf_info() and elf.get_section_by_name(".debug_info") is not None,
        loads=_load_segments(elf),
        symbols=_read_symbols(elf),
        notes=_read_usdt_notes(elf),
    )


def _read_facts_from(fh: BinaryIO, path: str) -> _Facts:
    """_read_facts on an open file, every failure an ElfError."""
    try:
        fh.seek(0)
        return _read_facts(ELFFile(fh), path)
    except ElfError:
        raise
    except (OSError, ValueError, struct.error) as exc:
        raise ElfError(f"{path}: cannot read ELF ({exc})") from exc
    except Exception as exc:  # pyelftools raises its own types on corrupt files
        raise ElfError(f"{path}: not a readable ELF file ({exc.__class__.__name__}: {exc})") from exc


def _read_facts_from_path(path: str) -> _Facts:
    try:
        with open(path, "rb") as fh:
            return _read_facts_from(fh, path)
    except OSError as exc:
        raise ElfError(f"{path}: cannot read ELF ({exc})") from exc


# --- Persistent cache: otel_ebpf/cachestore.py ------------------------------------------

def _unchanged(fh: BinaryIO, before: os.stat_result) -> bool:
    """Whether the file kept its size and mtime while we read it (else we store nothing)."""
    after = os.fstat(fh.fileno())
    return (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# --- File identity: the GNU build id, read without pyelftools --------------------------

_PT_LOAD = 1
_PT_NOTE = 4
_NT_GNU_BUILD_ID = 3


def _align(n: int, to: int) -> int:
    return (n + to - 1) & ~(to - 1)


def _gnu_build_id_in(notes: bytes, order: str, align: int) -> str | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from(order + "III", notes, pos)
        desc_at = pos + 12 + _align(namesz, align)
        if desc_at + descsz > len(notes):
            return None
        if ntype == _NT_GNU_BUILD_ID and notes[pos + 12:pos + 12 + namesz] == b"GNU\0" and descsz:
            return notes[desc_at:desc_at + descsz].hex()
        pos = desc_at + _align(descsz, align)
    return None


def _program_headers(fh: BinaryIO) -> tuple[str, list[tuple[int, int, int, int, int]]] | None:
    """Byte order and (p_type, p_offset, p_vaddr, p_filesz, p_align) of each program header,
    or None when this reader cannot tell (not ELF, PN_XNUM headers)."""
    fh.seek(0)
    head = fh.read(64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # Elf64_Ehdr: e_phoff at 32, e_phentsize/e_phnum at 54; Elf64_Phdr
        (phoff,) = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        fmt, fields = order + "IIQQQQQQ", (0, 2, 3, 5, 7)
    else:  # Elf32_Ehdr: e_phoff at 28, e_phentsize/e_phnum at 42; Elf32_Phdr
        (phoff,) = struct.unpack_from(order + "I", head, 28)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
        fmt, fields = order + "IIIIIIII", (0, 1, 2, 4, 7)
    if phnum == 0:
        return order, []
    if phnum == 0xFFFF or phentsize < struct.calcsize(fmt):
        return None
    fh.seek(phoff)
    table = fh.read(phentsize * phnum)
    rows = [struct.unpack_from(fmt, table, i * phentsize) for i in range(len(table) // phentsize)]
    return order, [tuple(row[f] for f in fields) for row in rows]  # type: ignore[misc]


def read_build_id(fh: BinaryIO) -> str | None:
    """The GNU build id (hex) from the PT_NOTE segments of an open ELF file, or None.

    Only the headers and a few note bytes are read: this is all a cache hit reads of the binary.
    """
    try:
        found = _program_headers(fh)
        if found is None:
            return None
        order, headers = found
        for p_type, p_offset, _vaddr, p_filesz, p_align in headers:
            if p_type != _PT_NOTE or p_filesz > 1 << 16:
                continue
            fh.seek(p_offset)
            build_id = _gnu_build_id_in(fh.read(p_filesz), order, 8 if p_align == 8 else 4)
            if build_id:
                return build_id
    except (OSError, struct.error, ValueError, IndexError):
        return None  # no build id: the inode identifies the file instead
    return None


def _file_identity(fh: BinaryIO, st: os.stat_result) -> str:
    """The build id when the file has one (a copy elsewhere shares its entry), else the inode."""
    build_id = read_build_id(fh)
    if build_id:
        return f"build-id:{build_id}"
    return f"inode:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


# --- ElfInfo entries --------------------------------------------------------------------
#
# payload: u32 length of a JSON object (machine, flags, segments, notes, symbol count n),
# the JSON, n u64 st_value, n u64 st_size (little-endian), then the n names joined by NUL
# (a name never holds one: names end at the NUL of their string table).

_U64 = "Q"


def _u64_array(values: Iterator[int] | bytes) -> array.array:
    out = array.array(_U64)
    if out.itemsize != 8:  # pragma: no cover - every Linux target has an 8-byte "Q"
        raise ValueError("no 8-byte array type")
    if isinstance(values, bytes):
        out.frombytes(values)
        if sys.byteorder == "big":
            out.byteswap()
    else:
        out.extend(values)
    return out


def _u64_bytes(values: array.array) -> bytes:
    if sys.byteorder == "big":
        values = array.array(_U64, values)
        values.byteswap()
    return values.tobytes()


def _facts_to_payload(facts: _Facts) -> bytes:
    meta = {
        "machine": facts.machine, "is_pie": facts.is_pie, "has_symtab": facts.has_symtab,
        "has_dwarf": facts.has_dwarf, "loads": facts.loads, "nsyms": len(facts.symbols),
        "notes": [[n.provider, n.name, n.pc, n.semaphore, n.arg_string] for n in facts.notes],
    }
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    values = _u64_array(v for v, _ in facts.symbols.values())
    sizes = _u64_array(s for _, s in facts.symbols.values())
    names = "\0".join(facts.symbols).encode("utf-8")
    return struct.pack("<I", len(meta_bytes)) + meta_bytes + _u64_bytes(values) + _u64_bytes(sizes) + names


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"malformed entry: {what}")


def _notes_from_meta(raw: object) -> tuple[_Note, ...]:
    _check(isinstance(raw, list), "notes")
    notes = []
    for n in raw:  # type: ignore[union-attr]
        _check(isinstance(n, list) and len(n) == 5 and all(isinstance(n[i], str) for i in (0, 1, 4))
               and _is_int(n[2]) and _is_int(n[3]), "note")
        notes.append(_Note(n[0], n[1], n[2], n[3], n[4]))
    return tuple(notes)


def _facts_from_payload(payload: bytes) -> _Facts:
    """The facts of an entry, or ValueError: a format slip must be a miss, never a wrong answer."""
    (meta_len,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + meta_len])
    _check(isinstance(meta, dict), "meta")
    n = meta.get("nsyms")
    _check(_is_int(n), "symbol count")
    at = 4 + meta_len
    values, sizes = _u64_array(payload[at:at + 8 * n]), _u64_array(payload[at + 8 * n:at + 16 * n])
    names = payload[at + 16 * n:].decode("utf-8").split("\0") if n else []
    _check(len(values) == len(sizes) == len(names) == n, "symbol table length")
    symbols = _SymbolMap(names, values, sizes)
    _check(len(symbols) == n, "duplicate symbols")
    loads = meta.get("loads")
    _check(isinstance(loads, list) and all(isinstance(s, list) and len(s) == 3 and all(map(_is_int, s))
                                           for s in loads), "segments")
    _check(meta.get("machine") in _MACHINES.values(), "machine")
    flags = [meta.get(f) for f in ("is_pie", "has_symtab", "has_dwarf")]
    _check(all(isinstance(f, bool) for f in flags), "flags")
    return _Facts(meta["machine"], *flags, loads=tuple(tuple(s) for s in loads),  # type: ignore[arg-type]
                  symbols=symbols, notes=_notes_from_meta(meta.get("notes")))


def _load_cached_info(cls: type[ElfInfo], directory: str, key: str, st: os.stat_result,
                      path: str) -> ElfInfo | None:
    payload = _read_entry(directory, _KIND_ELF, key, st)
    if payload is None:
        return None
    try:
        return cls(path, _facts_from_payload(payload), from_cache=True)
    except Exception as exc:  # noqa: BLE001 - a bad entry is a miss
        log.debug("elf cache: entry for %s unusable (%s: %s)", path, exc.__class__.__name__, exc)
        return None


# --- ElfInfo ---------------------------------------------------------------------------

class ElfInfo:
    """One binary's symbols, segments and USDT notes, read once.

    ``ElfInfo(path)`` reads the file; ``ElfInfo.load(path)`` (and ``elf_info``) go through
    the persistent cache first. ``from_cache`` tells which happened.
    """

    def __init__(self, path: str, facts: _Facts | None = None, from_cache: bool = False):
        self.path = path
        self.from_cache = from_cache
        self._facts = facts if facts is not None else _read_facts_from_path(path)
        self.machine = self._facts.machine
        self.is_pie = self._facts.is_pie
        self.has_symtab = self._facts.has_symtab
        self.has_dwarf = self._facts.has_dwarf
        self._loads = list(self._facts.loads)
        self._symbols = self._facts.symbols
        self.probes = [self._probe(note) for note in self._facts.notes]

    @classmethod
    def load(cls, path: str, cache_dir: str | os.PathLike | None | _Unset = _UNSET) -> ElfInfo:
        """ElfInfo from the persistent cache when it holds this very file, else read (and stored).

        ``cache_dir``: a directory, None/"" for no cache, omitted for the module's choice.
        """
        directory = _resolve_cache_dir(cache_dir)
        if directory is None:
            return cls(path)
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise ElfError(f"{path}: cannot read ELF ({exc})") from exc
        with fh:
            st = os.fstat(fh.fileno())  # of the file read, not of whatever the path names later
            key = "elf/" + _file_identity(fh, st)
            cached = _load_cached_info(cls, directory, key, st, path)
            if cached is not None:
                return cached
            info = cls(path, _read_facts_from(fh, path))
            if _unchanged(fh, st):
                _store(directory, _KIND_ELF, key, st, lambda: _facts_to_payload(info._facts), path)
            return info

    def vaddr_to_offset(self, vaddr: int) -> int:
        for start, size, offset in self._loads:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        raise ElfError(f"{self.path}: address {vaddr:#x} is in no loadable segment")

    def symbol(self, name: str) -> Symbol | None:
        found = self._symbols.get(name)
        if found is None:
            return None
        vaddr, size = found
        try:
            offset = self.vaddr_to_offset(vaddr)
        except ElfError:
            offset = -1  # data in .bss has no file bytes; its address is still useful
        return Symbol(name, vaddr, size, offset)

    def symbols_matching(self, pattern: str) -> list[Symbol]:
        rx = re.compile(pattern)
        return [s for n in self._symbols if rx.fullmatch(n) and (s := self.symbol(n))]

    def _probe(self, note: _Note) -> UsdtProbe:
        try:
            args = parse_args(note.arg_string, self.machine)
        except ElfError:
            args = ()
        return UsdtProbe(
            provider=note.provider,
            name=note.name,
            pc=note.pc,
            file_offset=self.vaddr_to_offset(note.pc),
            semaphore=note.semaphore,
            semaphore_offset=self.vaddr_to_offset(note.semaphore) if note.semaphore else 0,
            arg_string=note.arg_string,
            args=args,
        )

    def usdt(self, provider: str, name: str) -> list[UsdtProbe]:
        """Every site of one probe (a probe inlined in several places has several)."""
        return [p for p in self.probes if p.provider == provider and p.name == name]

    def usdt_arg_macro(self, provider: str, name: str, index: int) -> str:
        """C expression reading argument ``index`` (1-based) at any site of the probe.

        Sites whose specs differ are told apart by the low 12 bits of the instruction
        pointer, which a page-aligned load base does not change (4K, 16K or 64K pages).
        """
        sites = self.usdt(provider, name)
        if not sites:
            raise ElfError(f"{self.path}: no USDT probe {provider}:{name}")
        exprs: dict[int, str] = {}
        for site in sites:
            try:
                arg = parse_args(site.arg_string, self.machine)[index - 1]
            except IndexError as exc:
                raise ElfError(f"{self.path}: {provider}:{name} has no argument {index}") from exc
            sym = self.symbol(arg.symbol) if arg.kind == "rip" else None
            exprs[site.pc] = arg.c_expr(site.pc, sym.vaddr if sym else None)
        distinct = set(exprs.values())
        if len(distinct) == 1:
            return distinct.pop()
        by_page_offset: dict[int, str] = {}
        for pc, expr in exprs.items():
            if by_page_offset.get(pc & 0xFFF, expr) != expr:
                raise ElfError(f"{self.path}: sites of {provider}:{name} cannot be told apart")
            by_page_offset[pc & 0xFFF] = expr
        ip = instruction_pointer_expr(self.machine)
        chain = "0ULL"
        for low, expr in by_page_offset.items():
            chain = f"(({ip} & 0xfff) == {low:#x} ? {expr} : {chain})"
        return chain


@functools.lru_cache(maxsize=64)
def _cached(path: str, dev: int, ino: int, size: int, mtime: int, directory: str | None) -> ElfInfo:
    return ElfInfo.load(path, cache_dir=directory)


def elf_info(path: str, cache_dir: str | os.PathLike | None | _Unset = _UNSET) -> ElfInfo:
    """ElfInfo for a path, kept per file identity in this process (a replaced binary is
    read again) and across processes in the persistent cache (``cache_dir``: see ElfInfo.load)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ElfError(f"{path}: {exc.strerror}") from exc
    directory = _resolve_cache_dir(cache_dir)
    return _cached(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, directory)


# --- DWARF: struct layouts ----------------------------------------------------------

DEBUG_ROOT = "/usr/lib/debug"


def _build_id(elf: ELFFile) -> str | None:
    section = elf.get_section_by_name(".note.gnu.build-id")
    if not isinstance(section, NoteSection):
        return None
    for note in section.iter_notes():
        if note["n_type"] == "NT_GNU_BUILD_ID":
            return str(note["n_desc"])
    return None


def _debuglink(elf: ELFFile) -> str | None:
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None:
        return None
    return section.data().split(b"\0", 1)[0].decode("utf-8", "replace") or None


def debug_file_for(path: str) -> str | None:
    """The file holding `path`'s DWARF: itself, or its separate debug file found by
    build id (/usr/lib/debug/.build-id/xx/yyyy.debug) or .gnu_debuglink. A debug file
    whose build id differs from the binary's is not taken."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if elf.get_section_by_name(".debug_info") is not None:
                return path
            build_id, link = _build_id(elf), _debuglink(elf)
    except Exception:  # noqa: BLE001 - pyelftools raises its own types on corrupt files
        return None
    candidates = []
    if build_id and len(build_id) > 2:
        candidates.append(os.path.join(DEBUG_ROOT, ".build-id", build_id[:2], build_id[2:] + ".debug"))
    if link:
        real_dir = os.path.dirname(os.path.realpath(path))
        candidates += [os.path.join(real_dir, link), os.path.join(real_dir, ".debug", link),
                       DEBUG_ROOT + os.path.join(real_dir, link)]
    for candidate in candidates:
        try:
            with open(candidate, "rb") as fh:
                debug = ELFFile(fh)
                if debug.get_section_by_name(".debug_info") is None:
                    continue
                if build_id and _build_id(debug) not in (None, build_id):
                    continue
                return candidate
        except Exception:  # noqa: BLE001
            continue
    return None


def _strip_type(die):
    """Follow typedefs and qualifiers to the type that has the members."""
    seen = 0
    while die is not None and die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type") \
            and "DW_AT_type" in die.attributes and seen < 16:
        die = die.get_DIE_from_attribute("DW_AT_type")
        seen += 1
    return die


def _member_location(member) -> int | None:
    attr = member.attributes.get("DW_AT_data_member_location")
    if attr is None:
        return 0 if member.get_parent() is not None and member.get_parent().tag == "DW_TAG_union_type" else None
    if isinstance(attr.value, int):
        return attr.value
    if isinstance(attr.value, list) and len(attr.value) == 2 and attr.value[0] == 0x23:  # DW_OP_plus_uconst
        return attr.value[1]
    return None


SIZE_MEMBER = "@size"  # in `wanted`: the struct's own size (DW_AT_byte_size), not a member


def _member_offset(struct_die, dotted: str) -> int | None:
    if dotted == SIZE_MEMBER:
        die = _strip_type(struct_die)
        size = die.attributes.get("DW_AT_byte_size") if die is not None else None
        return size.value if size is not None and isinstance(size.value, int) else None
    offset = 0
    die = struct_die
    for part in dotted.split("."):
        die = _strip_type(die)
        if die is None or die.tag not in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            return None
        for child in die.iter_children():
            name = child.attributes.get("DW_AT_name")
            if child.tag == "DW_TAG_member" and name is not None and name.value.decode() == part:
                location = _member_location(child)
                if location is None or "DW_AT_bit_size" in child.attributes:
                    return None  # bit-fields have no byte offset
                offset += location
                die = child.get_DIE_from_attribute("DW_AT_type")
                break
        else:
            return None
    return offset


def _read_member_offsets(fh: BinaryIO, source: str, wanted: dict[str, tuple[str, ...]],
                         cu_hint: str) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    try:
        elf = ELFFile(fh)
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=elf.header["e_type"] == "ET_REL")
        cus = list(dwarf.iter_CUs())

        def cu_name(cu) -> str:
            attr = cu.get_top_DIE().attributes.get("DW_AT_name")
            return attr.value.decode("utf-8", "replace") if attr else ""

        if cu_hint:
            cus.sort(key=lambda cu: cu_hint not in cu_name(cu))
        for cu in cus:
            for die in cu.get_top_DIE().iter_children():
                name_attr = die.attributes.get("DW_AT_name")
                if name_attr is None or die.tag not in ("DW_TAG_typedef", "DW_TAG_structure_type"):
                    continue
                type_name = name_attr.value.decode("utf-8", "replace")
                if type_name not in wanted or "DW_AT_declaration" in die.attributes:
                    continue
                offsets = {m: off for m in wanted[type_name]
                           if (off := _member_offset(die, m)) is not None}
                if len(offsets) > len(found.get(type_name, {})):
                    found[type_name] = offsets
            if all(len(found.get(t, {})) == len(m) for t, m in wanted.items()):
                break
    except ElfError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises its own types on odd DWARF
        raise ElfError(f"{source}: cannot read DWARF ({exc.__class__.__name__}: {exc})") from exc
    return found


def _dwarf_key(fh: BinaryIO, st: os.stat_result, wanted: dict[str, tuple[str, ...]], cu_hint: str) -> str:
    # cu_hint is part of the question: it decides which of two same-named types is met first.
    request = json.dumps([sorted((t, list(m)) for t, m in wanted.items()), cu_hint], separators=(",", ":"))
    return f"dwarf/{_file_identity(fh, st)}/{request}"


def _offsets_from_payload(payload: bytes, wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
    found = json.loads(payload)
    _check(isinstance(found, dict), "offsets")
    for type_name, members in found.items():
        _check(type_name in wanted and isinstance(members, dict), "type")
        _check(all(m in wanted[type_name] and _is_int(off) for m, off in members.items()), "member")
    return found


def _cached_offsets(directory: str, key: str, st: os.stat_result,
                    wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]] | None:
    payload = _read_entry(directory, _KIND_DWARF, key, st)
    if payload is None:
        return None
    try:
        return _offsets_from_payload(payload, wanted)
    except Exception as exc:  # noqa: BLE001 - a bad entry is a miss
        log.debug("elf cache: DWARF entry unusable (%s: %s)", exc.__class__.__name__, exc)
        return None


def dwarf_member_offsets(path: str, wanted: dict[str, tuple[str, ...]], cu_hint: str = "",
                         cache_dir: str | os.PathLike | None | _Unset = _UNSET,
                         ) -> tuple[str, dict[str, dict[str, int]]]:
    """Byte offsets of struct members from the DWARF of `path` or of its debug file.

    ``wanted`` maps a type name (typedef or struct tag) to member paths, dotted for
    nested structs (``"headers_out.status"``). Returns the file the DWARF came from and
    the offsets found; members not found (or bit-fields) are left out. Compile units
    whose name contains ``cu_hint`` are searched first: a large binary has thousands.
    The answer is kept in the persistent cache (``cache_dir`` as for ElfInfo.load), keyed
    by the debug file and the question. Raises ElfError when there is no DWARF to read.
    """
    source = debug_file_for(path)
    if source is None:
        raise ElfError(f"{path}: no DWARF (not in the binary, no debug file found by build id or debuglink)")
    directory = _resolve_cache_dir(cache_dir)
    try:
        fh = open(source, "rb")
    except OSError as exc:
        raise ElfError(f"{source}: cannot read DWARF ({exc.__class__.__name__}: {exc})") from exc
    with fh:
        st = os.fstat(fh.fileno())
        key = _dwarf_key(fh, st, wanted, cu_hint) if directory else ""
        cached = _cached_offsets(directory, key, st, wanted) if directory else None
        if cached is not None:
            return source, cached
        fh.seek(0)
        found = _read_member_offsets(fh, source, wanted, cu_hint)
        if directory and _unchanged(fh, st):
            _store(directory, _KIND_DWARF, key, st,
                   lambda: json.dumps(found, separators=(",", ":")).encode("utf-8"), source)
    return source, found
