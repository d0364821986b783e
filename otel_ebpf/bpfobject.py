"""A compiled probe program as data: its maps, its functions' BPF instructions, and where
those instructions name a map. What bcc compiles once (in a short-lived child process,
otel_ebpf/compiler.py) is stored in the cache as this; the agent loads it with
otel_ebpf/loader.py, without the compiler in its own process.

bcc writes a map's file descriptor into the instructions that use it (a 16-byte
`ld_imm64` whose source register is BPF_PSEUDO_MAP_FD). Those descriptors belong to the
compiling process: `relocations` says which instruction names which map, and `relocate`
writes the loading process's descriptors there.
"""
from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field

FORMAT = 1  # bump when the layout below changes
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
INSN_SIZE = 8
# Program types (linux/bpf.h): uprobes are kprobe programs; the fork tracepoint is one.
PROG_KPROBE, PROG_TRACEPOINT = 2, 5
TRACEPOINT_PREFIX = "tracepoint__"  # bcc's TRACEPOINT_PROBE(category, event) function names


class ObjectError(Exception):
    """A stored program that cannot be used (the caller compiles it again)."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    prog_type: int
    insns: bytes
    relocations: tuple[tuple[int, str], ...]  # (instruction index, map name)

    @property
    def tracepoint(self) -> tuple[str, str] | None:
        """(category, event) of a TRACEPOINT_PROBE function, else None."""
        if not self.name.startswith(TRACEPOINT_PREFIX):
            return None
        category, _, event = self.name[len(TRACEPOINT_PREFIX):].partition("__")
        return (category, event) if category and event else None


@dataclass(frozen=True)
class CompiledObject:
    license: str
    kern_version: int
    maps: tuple[MapSpec, ...]
    functions: tuple[FunctionSpec, ...] = field(default_factory=tuple)

    def function(self, name: str) -> FunctionSpec:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise ObjectError(f"no function {name!r} in the compiled program")

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "license": self.license, "kern_version": self.kern_version,
            "maps": [m.__dict__ for m in self.maps],
            "functions": [{"name": f.name, "prog_type": f.prog_type,
                           "insns": base64.b64encode(f.insns).decode(),
                           "relocations": [list(r) for r in f.relocations]} for f in self.functions],
        }, separators=(",", ":")).encode()

    @staticmethod
    def from_bytes(blob: bytes) -> "CompiledObject":
        try:
            data = json.loads(blob)
            if data.get("format") != FORMAT:
                raise ObjectError(f"format {data.get('format')}, want {FORMAT}")
            maps = tuple(MapSpec(str(m["name"]), int(m["type"]), int(m["key_size"]), int(m["value_size"]),
                                 int(m["max_entries"]), int(m["flags"])) for m in data["maps"])
            names = {m.name for m in maps}
            functions = []
            for f in data["functions"]:
                insns = base64.b64decode(f["insns"], validate=True)
                if len(insns) % INSN_SIZE:
                    raise ObjectError(f"{f['name']}: instructions of {len(insns)} bytes")
                relocations = tuple((int(i), str(m)) for i, m in f["relocations"])
                for index, name in relocations:
                    if name not in names or not 0 <= index < len(insns) // INSN_SIZE - 1:
                        raise ObjectError(f"{f['name']}: relocation ({index}, {name!r}) out of place")
                functions.append(FunctionSpec(str(f["name"]), int(f["prog_type"]), insns, relocations))
            return CompiledObject(str(data["license"]), int(data["kern_version"]), maps, tuple(functions))
        except ObjectError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ObjectError(f"not a compiled program ({exc.__class__.__name__}: {exc})") from None


def find_relocations(insns: bytes, fd_names: dict[int, str]) -> tuple[tuple[int, str], ...]:
    """Instructions that load a map's descriptor (ld_imm64 with BPF_PSEUDO_MAP_FD), by the
    compiling process's descriptors. An unknown descriptor is an error: it would be loaded
    as some other map."""
    out = []
    count = len(insns) // INSN_SIZE
    i = 0
    while i < count:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * INSN_SIZE)
        if code == BPF_LD_IMM64:
            if regs >> 4 == BPF_PSEUDO_MAP_FD:
                if imm not in fd_names:
                    raise ObjectError(f"instruction {i} names map fd {imm}, which is no map of the program")
                out.append((i, fd_names[imm]))
            i += 2  # ld_imm64 takes two instruction slots
            continue
        i += 1
    return tuple(out)


def relocate(fn: FunctionSpec, fds: dict[str, int]) -> bytes:
    """The function's instructions with this process's map descriptors written in."""
    insns = bytearray(fn.insns)
    for index, name in fn.relocations:
        struct.pack_into("<i", insns, index * INSN_SIZE + 4, fds[name])
    return bytes(insns)
