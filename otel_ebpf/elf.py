"""ELF facts a probe needs, read with pyelftools: symbols, file offsets, USDT notes.

The kernel attaches uprobes at *file offsets*, while symbols and USDT notes give
*virtual addresses*; every conversion goes through the PT_LOAD segment that
holds the address. USDT argument specs (``8@%rbx``, ``-4@-144(%rbp)``) become C
expressions over ``struct pt_regs *ctx`` that a probe's C file receives as
``-D`` macros (see ``UsdtProbe.arg_macro``).
"""
from __future__ import annotations

import functools
import os
import re
import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection


class ElfError(Exception):
    """A binary that cannot be read or does not hold what a probe needs."""


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    vaddr: int
    size: int
    file_offset: int


@dataclass(frozen=True, slots=True)
class UsdtArg:
    """One USDT argument: where gcc left it and how wide it is."""

    spec: str
    size: int  # bytes; negative = signed
    kind: str  # "reg" | "const" | "mem" | "rip"
    reg: str = ""
    index_reg: str = ""
    scale: int = 1
    disp: int = 0
    symbol: str = ""  # for rip-relative "sym(%rip)"

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
            addr = f"ctx->ip - {pc_vaddr}ULL + {symbol_vaddr + self.disp}ULL"
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


def _reg(name: str, spec: str) -> str:
    field = _REGS.get(name.lstrip("%"))
    if field is None:
        raise ElfError(f"unknown register {name!r} in USDT argument {spec!r}")
    return field


def parse_arg(spec: str) -> UsdtArg:
    """Parse one argument spec as gcc writes it in ``.note.stapsdt``."""
    m = _ARG_RE.match(spec.strip())
    if m:
        size, operand = int(m.group(1)), m.group(2)
    else:  # very old notes have no size: assume a signed long
        size, operand = -8, spec.strip()
    if size == 0 or abs(size) not in (1, 2, 4, 8):
        raise ElfError(f"bad USDT argument size in {spec!r}")
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


def parse_args(arg_string: str) -> tuple[UsdtArg, ...]:
    return tuple(parse_arg(a) for a in arg_string.split()) if arg_string.strip() else ()


class ElfInfo:
    """One binary's symbols, segments and USDT notes, read once."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as fh:
                elf = ELFFile(fh)
                if elf.get_machine_arch() != "x64":
                    raise ElfError(f"{path}: {elf.get_machine_arch()} binaries are not supported (x86-64 only)")
                self.is_pie = elf.header["e_type"] == "ET_DYN"
                self._loads = [
                    (seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
                    for seg in elf.iter_segments()
                    if seg["p_type"] == "PT_LOAD"
                ]
                self.has_symtab = elf.get_section_by_name(".symtab") is not None
                self.has_dwarf = elf.has_dwarf_info() and elf.get_section_by_name(".debug_info") is not None
                self._symbols = self._read_symbols(elf)
                self.probes = self._read_usdt(elf)
        except (OSError, ValueError, struct.error) as exc:
            raise ElfError(f"{path}: cannot read ELF ({exc})") from exc
        except Exception as exc:  # pyelftools raises its own types on corrupt files
            if isinstance(exc, ElfError):
                raise
            raise ElfError(f"{path}: not a readable ELF file ({exc.__class__.__name__}: {exc})") from exc

    def vaddr_to_offset(self, vaddr: int) -> int:
        for start, size, offset in self._loads:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        raise ElfError(f"{self.path}: address {vaddr:#x} is in no loadable segment")

    def _read_symbols(self, elf: ELFFile) -> dict[str, tuple[int, int]]:
        symbols: dict[str, tuple[int, int]] = {}
        for name in (".symtab", ".dynsym"):  # .symtab first: it has local symbols too
            section = elf.get_section_by_name(name)
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.iter_symbols():
                if sym["st_value"] and sym["st_shndx"] != "SHN_UNDEF" and sym.name:
                    symbols.setdefault(sym.name, (sym["st_value"], sym["st_size"]))
        return symbols

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

    def _read_usdt(self, elf: ELFFile) -> list[UsdtProbe]:
        notes = elf.get_section_by_name(".note.stapsdt")
        if not isinstance(notes, NoteSection):
            return []
        base_section = elf.get_section_by_name(".stapsdt.base")
        actual_base = base_section["sh_addr"] if base_section is not None else None
        addr_size = elf.elfclass // 8
        fmt = "<QQQ" if addr_size == 8 else "<III"
        probes: list[UsdtProbe] = []
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
            args_text = arg_string.decode("ascii", "replace")
            try:
                args = parse_args(args_text)
            except ElfError:
                args = ()
            probes.append(UsdtProbe(
                provider=provider.decode("ascii", "replace"),
                name=name.decode("ascii", "replace"),
                pc=pc,
                file_offset=self.vaddr_to_offset(pc),
                semaphore=semaphore,
                semaphore_offset=self.vaddr_to_offset(semaphore) if semaphore else 0,
                arg_string=args_text,
                args=args,
            ))
        return probes

    def usdt(self, provider: str, name: str) -> list[UsdtProbe]:
        """Every site of one probe (a probe inlined in several places has several)."""
        return [p for p in self.probes if p.provider == provider and p.name == name]

    def usdt_arg_macro(self, provider: str, name: str, index: int) -> str:
        """C expression reading argument ``index`` (1-based) at any site of the probe.

        Sites whose specs differ are told apart by the low 12 bits of the instruction
        pointer, which a page-aligned load base does not change.
        """
        sites = self.usdt(provider, name)
        if not sites:
            raise ElfError(f"{self.path}: no USDT probe {provider}:{name}")
        exprs: dict[int, str] = {}
        for site in sites:
            try:
                arg = parse_args(site.arg_string)[index - 1]
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
        chain = "0ULL"
        for low, expr in by_page_offset.items():
            chain = f"((ctx->ip & 0xfff) == {low:#x} ? {expr} : {chain})"
        return chain


@functools.lru_cache(maxsize=64)
def _cached(path: str, dev: int, ino: int, mtime: int) -> ElfInfo:
    return ElfInfo(path)


def elf_info(path: str) -> ElfInfo:
    """ElfInfo for a path, cached per file identity (a replaced binary is read again)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ElfError(f"{path}: {exc.strerror}") from exc
    return _cached(path, st.st_dev, st.st_ino, st.st_mtime_ns)


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


def _member_offset(struct_die, dotted: str) -> int | None:
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


def dwarf_member_offsets(path: str, wanted: dict[str, tuple[str, ...]],
                         cu_hint: str = "") -> tuple[str, dict[str, dict[str, int]]]:
    """Byte offsets of struct members from the DWARF of `path` or of its debug file.

    ``wanted`` maps a type name (typedef or struct tag) to member paths, dotted for
    nested structs (``"headers_out.status"``). Returns the file the DWARF came from and
    the offsets found; members not found (or bit-fields) are left out. Compile units
    whose name contains ``cu_hint`` are searched first: a large binary has thousands.
    Raises ElfError when there is no DWARF to read.
    """
    source = debug_file_for(path)
    if source is None:
        raise ElfError(f"{path}: no DWARF (not in the binary, no debug file found by build id or debuglink)")
    found: dict[str, dict[str, int]] = {}
    try:
        with open(source, "rb") as fh:
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
    return source, found
