"""The only module that touches bcc: compile a probe's C file (`compile_object`, in the
short-lived compiler process; or `compile_program` in-process), and the helpers around it.

bcc is imported on first use, not with this module: the agent itself loads compiled
programs without it (otel_ebpf/loader.py) and so never maps bcc's LLVM (60 MB of RSS).

With `compile_program`, uprobes are attached through libbcc's ``bpf_attach_uprobe``
called directly with its seventh argument, ``ref_ctr_offset``: the kernel then
increments a USDT probe's semaphore in every process that maps the file, including
processes forked or started after the attach (bcc's Python USDT class refuses
system-wide attach to probes with semaphores). Attachments are per file (pid -1), so
every worker and backend of a server is covered by one attach.
"""
from __future__ import annotations

import ctypes as ct
import itertools
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bpfobject import CompiledObject

log = logging.getLogger(__name__)

_bcc_module = None
BCC_IMPORT_ERROR: str | None = None


def _bcc():
    """bcc, imported on first use (Debian's python3-bpfcc, through a venv with system site
    packages); BpfError when it is not importable."""
    global _bcc_module, BCC_IMPORT_ERROR
    if _bcc_module is None:
        try:
            import bcc  # type: ignore[import-not-found]
        except Exception as exc:  # noqa: BLE001 - any import failure means "no bcc"
            BCC_IMPORT_ERROR = f"{exc.__class__.__name__}: {exc}"
            raise BpfError(f"bcc is not importable ({BCC_IMPORT_ERROR}); install python3-bpfcc") from None
        _bcc_module = bcc
    return _bcc_module


def bcc_available() -> tuple[bool, str]:
    """Whether bcc can be imported, without importing it (that maps LLVM): its Python
    package and libbcc are there."""
    import ctypes.util
    import importlib.util
    if importlib.util.find_spec("bcc") is None:
        return False, "the bcc Python package is not installed"
    if ctypes.util.find_library("bcc") is None:
        return False, "libbcc is not installed"
    return True, ""


class BpfError(Exception):
    """Compiling, loading or attaching failed; the message says what and where."""


BPF_PROBE_ENTRY, BPF_PROBE_RETURN = 0, 1
_ev_counter = itertools.count()


def probes_dir() -> str:
    """Directory of the shipped BPF C files (works from a checkout and from a wheel)."""
    return str(resources.files("otel_ebpf.probes"))


def check_source_safe(path: str) -> None:
    """Refuse C source that someone other than root could have changed.

    The agent runs as root and compiles this file into the kernel: a file or
    directory writable by group or others would let any user inject code.
    """
    for p in (path, os.path.dirname(path)):
        st = os.stat(p)
        if st.st_uid not in (0, os.getuid()) or st.st_mode & 0o022:
            raise BpfError(
                f"refusing to load BPF C from {p}: it is writable by group/others or not "
                f"owned by root (mode {st.st_mode & 0o777:o}, uid {st.st_uid})"
            )


class _LibBcc:
    """libbcc entry points the Python binding does not expose with all their arguments."""

    def __init__(self) -> None:
        lib = ct.CDLL("libbcc.so.0", use_errno=True)
        self.attach_uprobe = lib.bpf_attach_uprobe
        self.attach_uprobe.restype = ct.c_int
        self.attach_uprobe.argtypes = [
            ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_uint64, ct.c_int, ct.c_uint32,
        ]
        self.detach_uprobe = lib.bpf_detach_uprobe
        self.detach_uprobe.restype = ct.c_int
        self.detach_uprobe.argtypes = [ct.c_char_p]
        self.close_perf_event_fd = lib.bpf_close_perf_event_fd
        self.close_perf_event_fd.restype = ct.c_int
        self.close_perf_event_fd.argtypes = [ct.c_int]


_libbcc: _LibBcc | None = None
_libbcc_lock = threading.Lock()


def libbcc() -> _LibBcc:
    global _libbcc
    with _libbcc_lock:
        if _libbcc is None:
            _libbcc = _LibBcc()
        return _libbcc


@dataclass
class Attachment:
    label: str  # what it watches, e.g. "postgresql:query__start"
    path: str
    offset: int
    retprobe: bool
    fd: int
    ev_name: str


@dataclass
class Program:
    """One compiled C file with its attachments and its ring buffer."""

    name: str
    bpf: object
    attachments: list[Attachment] = field(default_factory=list)
    _batch: list[bytes] = field(default_factory=list)
    _ringbuf_open: bool = False

    def attach_uprobe(self, fn_name: str, path: str, offset: int, *, retprobe: bool = False,
                      ref_ctr_offset: int = 0, label: str = "") -> Attachment:
        """Attach a BPF function at a file offset of `path`, for every process (pid -1)."""
        try:
            fd = self.bpf.load_func(fn_name.encode(), _bcc().BPF.KPROBE)
        except Exception as exc:
            raise BpfError(f"loading {fn_name} of {self.name}: {exc}") from exc
        ev_name = f"{'r' if retprobe else 'p'}_otel_ebpf_{os.getpid()}_{next(_ev_counter)}"
        lib = libbcc()
        ct.set_errno(0)
        perf_fd = lib.attach_uprobe(
            fd.fd, BPF_PROBE_RETURN if retprobe else BPF_PROBE_ENTRY, ev_name.encode(),
            path.encode(), offset, -1, ref_ctr_offset,
        )
        if perf_fd < 0:
            err = ct.get_errno()
            raise BpfError(
                f"attaching {label or fn_name} at {path}+{offset:#x}"
                f"{f' (semaphore at {ref_ctr_offset:#x})' if ref_ctr_offset else ''}: "
                f"{os.strerror(err) if err else 'failed'}"
            )
        att = Attachment(label or fn_name, path, offset, retprobe, perf_fd, ev_name)
        self.attachments.append(att)
        return att

    def open_ring_buffer(self, map_name: str = "events") -> None:
        def _collect(_ctx: object, data: int, size: int) -> int:
            self._batch.append(ct.string_at(data, size))
            return 0

        self.bpf[map_name].open_ring_buffer(_collect)  # type: ignore[index]
        self._ringbuf_open = True

    def drain(self) -> list[bytes]:
        """Every record waiting in the ring buffer, without blocking."""
        if not self._ringbuf_open:
            return []
        self.bpf.ring_buffer_consume()  # type: ignore[attr-defined]
        batch, self._batch = self._batch, []
        return batch

    def percpu_sum(self, map_name: str, count: int) -> list[int]:
        """Sum of a per-CPU array's values, index by index."""
        table = self.bpf[map_name]  # type: ignore[index]
        out = []
        for i in range(count):
            values = table.getvalue(table.Key(i))
            out.append(sum(int(v) for v in values))
        return out

    def percpu_value(self, map_name: str, index: int) -> int:
        table = self.bpf[map_name]  # type: ignore[index]
        return sum(int(v) for v in table.getvalue(table.Key(index)))

    def table_items(self, map_name: str) -> list[tuple[object, object]]:
        return list(self.bpf[map_name].items())  # type: ignore[index]

    def set_array_value(self, map_name: str, index: int, value: int) -> None:
        table = self.bpf[map_name]  # type: ignore[index]
        table[table.Key(index)] = table.Leaf(value)

    def set_hash_value(self, map_name: str, key: int, value: int) -> None:
        table = self.bpf[map_name]  # type: ignore[index]
        table[table.Key(key)] = table.Leaf(value)

    def key(self, map_name: str, value: int) -> object:
        table = self.bpf[map_name]  # type: ignore[index]
        return table.Key(value)

    def table_delete(self, map_name: str, keys: list[object]) -> int:
        table = self.bpf[map_name]  # type: ignore[index]
        deleted = 0
        for key in keys:
            try:
                del table[key]
                deleted += 1
            except KeyError:
                pass  # finished meanwhile
        return deleted

    def detach_all(self) -> None:
        lib = libbcc()
        for att in self.attachments:
            lib.close_perf_event_fd(att.fd)
            # A probe made through tracefs (the fallback when the uprobe PMU refuses, e.g.
            # without CAP_SYS_ADMIN) leaves an event to remove; libbcc finds it by name
            # and does nothing for probes made through the PMU.
            lib.detach_uprobe(att.ev_name.encode())
        self.attachments.clear()

    def close(self) -> None:
        self.detach_all()
        try:
            self.bpf.cleanup()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("bcc cleanup of %s failed", self.name, exc_info=True)


# Events of bcc's attach ([pr]_otel_ebpf_<pid>_<n>_bcc_<pid>) and of loader.py (otel_ebpf_<pid>_<n>).
_EVENT_RE = re.compile(r"^[pr]:uprobes/((?:[pr]_)?otel_ebpf_(\d+)_\d+(?:_bcc_\d+)?) ")


def remove_stale_events(tracefs: str = "/sys/kernel/tracing") -> int:
    """Remove tracefs uprobe events left by agents that died (SIGKILL) before detaching."""
    path = os.path.join(tracefs, "uprobe_events")
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    removed = 0
    for line in lines:
        m = _EVENT_RE.match(line)
        if not m or os.path.exists(f"/proc/{m.group(2)}"):
            continue
        try:  # tracefs refuses the seek that Python's append mode does
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"-:uprobes/{m.group(1)}\n".encode())
            finally:
                os.close(fd)
            removed += 1
        except OSError:
            log.debug("could not remove stale uprobe event %s", m.group(1), exc_info=True)
    return removed


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def source_text(c_file: str, directory: str | None = None) -> str:
    """The probe file with its local ("...") includes inlined, once each, as one text.

    bcc rewrites map calls only in the text it is given, not in headers it includes on
    its own: inlined, the shared prelude (probes/common.h) can hold the maps and the
    helpers that use them once for every target. System includes (<...>) stay."""
    directory = directory or probes_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        path = os.path.join(directory, name)
        if os.path.normpath(path) != path or os.path.dirname(path) != os.path.normpath(directory):
            raise BpfError(f"{c_file}: include {name!r} is outside {directory}")
        if name in seen:
            return f"/* {name}: already included */\n"
        seen.add(name)
        check_source_safe(path)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise BpfError(f"{c_file}: cannot read {name}: {exc.strerror}") from exc
        return _LOCAL_INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(c_file)


def use_kernel_headers() -> str:
    """Point bcc at the kernel headers kheaders.py finds (the running kernel's, another
    kernel's, the image's bundled ones): BCC_KERNEL_SOURCE when bcc would not find them
    by itself. Returns what was chosen, for the log and doctor."""
    import platform

    from . import kheaders
    source = kheaders.find_kernel_headers(platform.release(), os.environ)
    for key, value in kheaders.compile_environment(source).items():
        os.environ.setdefault(key, value)
    return f"{source.kind}: {source.path}"


def compile_program(name: str, c_file: str, cflags: list[str]) -> Program:
    """Compile one of the shipped probe files with its -D constants, in this process."""
    bcc = _bcc()
    text = source_text(c_file)
    flags = ["-Wno-unused-function", "-Wno-unused-variable", *cflags]
    use_kernel_headers()
    try:
        b = bcc.BPF(text=text.encode(), cflags=flags)
    except Exception as exc:
        raise BpfError(f"compiling {c_file} for {name}: {exc}") from exc
    finally:
        trim_heap()  # the next compile's peak does not stack on this one's garbage
    return Program(name=name, bpf=b)


# The compiler bcc runs in-process: its code and read-only data pages stay resident after
# a compile (about 80 MB here) although the agent needs them again only for the next one.
COMPILER_LIBRARIES = re.compile(r"/lib(LLVM|clang)[^/]*\.so[^/]*$")
MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4+


def trim_heap() -> None:
    """Hand the heap glibc keeps after frees (clang's AST: tens of MB) back to the system."""
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_compiler_memory(maps_path: str = "/proc/self/maps") -> int:
    """Give back to the system the compiler pages compiling left resident (compile_program
    already trimmed the heap after each compile); returns the bytes handed back.

    The pages of libLLVM/libclang the compiler touched stay in the agent's RSS. MADV_PAGEOUT
    reclaims those (clean, file-backed: they come back from the file should bcc compile
    again); on kernels without it, MADV_DONTNEED does the same for executable mappings,
    which are never written."""
    try:
        libc = ct.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = (ct.c_void_p, ct.c_size_t, ct.c_int)
    released = 0
    try:
        with open(maps_path) as fh:
            lines = fh.readlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not COMPILER_LIBRARIES.search(fields[5]) or "w" in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            released += end - start
        elif "x" in fields[1] and libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


def bcc_version() -> str:
    """bcc's version from its package metadata (no import of bcc itself)."""
    try:
        from importlib import metadata
        return metadata.version("bcc")
    except Exception:  # noqa: BLE001 - Debian's package may carry no metadata
        return "unknown"


def compile_object(text: str, cflags: list[str]) -> "CompiledObject":
    """Compile a probe program's text with bcc and describe what came out: its maps and
    every function's instructions with the places that name a map (bpfobject.py). The
    maps bcc made for it are this process's: the caller exits after writing the result."""
    from .bpfobject import CompiledObject, FunctionSpec, MapSpec, ObjectError, find_relocations
    from .loader import prog_type_of

    bcc = _bcc()
    use_kernel_headers()
    flags = ["-Wno-unused-function", "-Wno-unused-variable", *cflags]
    try:
        b = bcc.BPF(text=text.encode(), cflags=flags)
    except Exception as exc:
        raise BpfError(f"compiling: {exc}") from exc
    lib = bcc.libbcc.lib
    for fn, restype, argtypes in (("bpf_num_tables", ct.c_size_t, [ct.c_void_p]),
                                  ("bpf_table_name", ct.c_char_p, [ct.c_void_p, ct.c_size_t]),
                                  ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, ct.c_size_t]),
                                  ("bpf_table_key_size_id", ct.c_size_t, [ct.c_void_p, ct.c_size_t]),
                                  ("bpf_table_leaf_size_id", ct.c_size_t, [ct.c_void_p, ct.c_size_t])):
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    module = b.module
    maps, fd_names = [], {}
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i).decode()
        fd = lib.bpf_table_fd_id(module, i)
        fd_names[fd] = name
        maps.append(MapSpec(name, lib.bpf_table_type_id(module, i), lib.bpf_table_key_size_id(module, i),
                            lib.bpf_table_leaf_size_id(module, i), lib.bpf_table_max_entries_id(module, i),
                            lib.bpf_table_flags_id(module, i)))
    functions = []
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i).decode()
        start, size = lib.bpf_function_start(module, name.encode()), lib.bpf_function_size(module, name.encode())
        insns = ct.string_at(start, size)
        try:
            relocations = find_relocations(insns, fd_names)
        except ObjectError as exc:
            raise BpfError(f"{name}: {exc}") from exc
        functions.append(FunctionSpec(name, prog_type_of(name), insns, relocations))
    license = (lib.bpf_module_license(module) or b"GPL").decode()
    return CompiledObject(license, lib.bpf_module_kern_version(module), tuple(maps), tuple(functions))

