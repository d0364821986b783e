"""Load a compiled probe program (bpfobject.CompiledObject) into the kernel and attach it,
with the bpf() and perf_event_open() system calls and libbpf's ring buffer reader: no
compiler in the agent's process (bcc's LLVM alone is 60 MB of RSS once loaded).

Uprobes go through the uprobe PMU, with the USDT semaphore's file offset in its config
(`ref_ctr_offset`: the kernel raises it in every process that maps the file); where the
PMU refuses the caller (no CAP_SYS_ADMIN on some kernels) through a tracefs uprobe event
instead, as libbcc does. `LoadedProgram` has the methods the agent uses on bcc's
programs (attacher.ProgramLike), so the two are interchangeable.
"""
from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import itertools
import logging
import os
import platform
import struct
import threading
from dataclasses import dataclass
from types import SimpleNamespace

from .bpfobject import PROG_KPROBE, PROG_TRACEPOINT, CompiledObject, relocate

log = logging.getLogger(__name__)

# System call numbers by machine.
SYS_BPF = {"x86_64": 321, "aarch64": 280}
SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
BPF_PROG_LOAD = 5
BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH = 5, 6, 10
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
LOG_SIZE = 1 << 20
EVENT_PREFIX = "otel_ebpf"  # tracefs uprobe events: otel_ebpf_<pid>_<n> (bpf.remove_stale_events)

_machine = platform.machine()
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long
_ev_counter = itertools.count()
_lock = threading.Lock()


class LoadError(Exception):
    """Creating a map, loading a program or attaching it failed; the message says which."""


def _syscall_number(table: dict[str, int]) -> int:
    number = table.get(_machine)
    if number is None:
        raise LoadError(f"no system call number known for {_machine}")
    return number


def _bpf(cmd: int, attr: ct.Array) -> int:
    result = _libc.syscall(_syscall_number(SYS_BPF), cmd, ct.byref(attr), ct.sizeof(attr))
    if result < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _attr(*fields: tuple[str, int | bytes]) -> ct.Array:
    """A zeroed union bpf_attr (128 bytes) with fields packed in at byte offsets."""
    buf = (ct.c_char * 128)()
    for fmt_offset, value in fields:
        fmt, offset = fmt_offset.split("@")
        struct.pack_into("<" + fmt, buf, int(offset), value)
    return buf


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str) -> int:
    """BPF_MAP_CREATE; the new map's descriptor."""
    attr = _attr(("I@0", map_type), ("I@4", key_size), ("I@8", value_size), ("I@12", max_entries),
                 ("I@16", flags), ("16s@28", name.encode()[:15]))
    try:
        return _bpf(BPF_MAP_CREATE, attr)
    except OSError as exc:
        raise LoadError(f"creating map {name} (type {map_type}, {max_entries} entries): {exc.strerror}") from exc


def load_function(prog_type: int, insns: bytes, license: str, kern_version: int, name: str) -> int:
    """BPF_PROG_LOAD; the program's descriptor. A refusal carries the verifier's log."""
    insn_buf = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(license.encode())
    for log_level in (0, 1):  # the log only when the first attempt failed: it costs time
        log_buf = ct.create_string_buffer(LOG_SIZE if log_level else 1)
        attr = _attr(("I@0", prog_type), ("I@4", len(insns) // 8), ("Q@8", ct.addressof(insn_buf)),
                     ("Q@16", ct.addressof(lic)), ("I@24", log_level), ("I@28", LOG_SIZE if log_level else 0),
                     ("Q@32", ct.addressof(log_buf) if log_level else 0), ("I@40", kern_version),
                     ("16s@48", name.encode()[:15]))
        try:
            return _bpf(BPF_PROG_LOAD, attr)
        except OSError as exc:
            if log_level:
                tail = log_buf.value.decode("utf-8", "replace").strip().splitlines()[-12:]
                raise LoadError(f"loading {name}: {exc.strerror}\n" + "\n".join(tail)) from exc
    raise AssertionError("unreachable")


# --- perf events: uprobes and tracepoints -------------------------------------------------------


class PerfEventAttr(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64), ("config2", ct.c_uint64)]


def _perf_event_open(attr: PerfEventAttr) -> int:
    attr.size = ct.sizeof(PerfEventAttr)
    fd = _libc.syscall(_syscall_number(SYS_PERF_EVENT_OPEN), ct.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _pmu_bit(name: str) -> int | None:
    """Where the uprobe PMU takes a flag in `config`: 'config:0' -> 0 (None if absent)."""
    try:
        with open(f"{UPROBE_PMU}/format/{name}") as fh:
            spec = fh.read().strip()
    except OSError:
        return None
    field_name, _, bits = spec.partition(":")
    return int(bits.split("-")[0]) if field_name == "config" else None


def _bind(perf_fd: int, prog_fd: int, what: str) -> None:
    import fcntl
    try:
        fcntl.ioctl(perf_fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(perf_fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        os.close(perf_fd)
        raise LoadError(f"attaching {what}: {exc.strerror}") from exc


def _tracefs() -> str:
    for root in TRACEFS:
        if os.path.exists(f"{root}/uprobe_events"):
            return root
    raise LoadError("tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)")


def _write_tracefs(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # tracefs refuses the seek of Python's append mode
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _tracefs_event_id(category: str, event: str) -> int:
    with open(f"{_tracefs()}/events/{category}/{event}/id") as fh:
        return int(fh.read().strip())


@dataclass
class Attachment:
    label: str
    path: str
    offset: int
    retprobe: bool
    fd: int
    ev_name: str = ""  # a tracefs uprobe event to remove at detach ("" for the PMU)


def attach_uprobe(prog_fd: int, path: str, offset: int, retprobe: bool, ref_ctr_offset: int,
                  label: str) -> Attachment:
    """A uprobe at a file offset of `path` for every process (pid -1), running `prog_fd`."""
    what = f"{label} at {path}+{offset:#x}" + (f" (semaphore at {ref_ctr_offset:#x})" if ref_ctr_offset else "")
    pmu_error = ""
    try:
        with open(f"{UPROBE_PMU}/type") as fh:
            pmu = int(fh.read())
        attr = PerfEventAttr(type=pmu)
        retprobe_bit, ref_bit = _pmu_bit("retprobe"), _pmu_bit("ref_ctr_offset")
        if retprobe:
            attr.config |= 1 << (retprobe_bit or 0)
        if ref_ctr_offset:
            if ref_bit is None:
                raise LoadError(f"attaching {what}: this kernel's uprobes have no ref_ctr_offset (< 4.20)")
            attr.config |= ref_ctr_offset << ref_bit
        path_buf = ct.create_string_buffer(path.encode())
        attr.config1 = ct.addressof(path_buf)
        attr.config2 = offset
        fd = _perf_event_open(attr)
        _bind(fd, prog_fd, what)
        return Attachment(label, path, offset, retprobe, fd)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EINVAL):
            raise LoadError(f"attaching {what}: {exc.strerror}") from exc
        pmu_error = exc.strerror or str(exc)
    # The uprobe PMU refused us (no CAP_SYS_ADMIN on this kernel): a tracefs event.
    name = f"{EVENT_PREFIX}_{os.getpid()}_{next(_ev_counter)}"
    root = _tracefs()
    target = f"{path}:{offset:#x}" + (f"({ref_ctr_offset:#x})" if ref_ctr_offset else "")
    try:
        _write_tracefs(f"{root}/uprobe_events", f"{'r' if retprobe else 'p'}:uprobes/{name} {target}\n")
        fd = _perf_event_open(PerfEventAttr(type=PERF_TYPE_TRACEPOINT, config=_tracefs_event_id("uprobes", name)))
    except OSError as exc:
        _remove_event(name)
        raise LoadError(f"attaching {what}: {exc.strerror} (uprobe PMU: {pmu_error})") from exc
    _bind(fd, prog_fd, what)
    return Attachment(label, path, offset, retprobe, fd, name)


def attach_tracepoint(prog_fd: int, category: str, event: str) -> Attachment:
    label = f"{category}:{event}"
    try:
        fd = _perf_event_open(PerfEventAttr(type=PERF_TYPE_TRACEPOINT, config=_tracefs_event_id(category, event)))
    except OSError as exc:
        raise LoadError(f"attaching tracepoint {label}: {exc.strerror}") from exc
    _bind(fd, prog_fd, label)
    return Attachment(label, "", 0, False, fd)


def _remove_event(name: str) -> None:
    try:
        _write_tracefs(f"{_tracefs()}/uprobe_events", f"-:uprobes/{name}\n")
    except (OSError, LoadError):
        log.debug("could not remove uprobe event %s", name, exc_info=True)


# --- maps ------------------------------------------------------------------------------------


class BpfMap:
    """One map by descriptor: lookups, updates, deletes, iteration (keys and values as bytes)."""

    def __init__(self, spec, fd: int):
        self.spec = spec
        self.fd = fd
        self.percpu = spec.type in PERCPU_TYPES
        # A per-CPU map's value is one 8-byte-aligned slot per possible CPU.
        self._ncpus = _possible_cpus() if self.percpu else 1
        self._stride = (spec.value_size + 7) // 8 * 8 if self.percpu else spec.value_size
        self._value_bytes = self._stride * self._ncpus

    def _op(self, cmd: int, key: bytes, value: ct.Array | None = None, flags: int = 0) -> None:
        kbuf = ct.create_string_buffer(key, max(len(key), 1))
        attr = _attr(("I@0", self.fd), ("Q@8", ct.addressof(kbuf)),
                     ("Q@16", ct.addressof(value) if value is not None else 0), ("Q@24", flags))
        _bpf(cmd, attr)

    def lookup(self, key: bytes) -> bytes | None:
        value = ct.create_string_buffer(self._value_bytes)
        try:
            self._op(BPF_MAP_LOOKUP_ELEM, key, value)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        self._op(BPF_MAP_UPDATE_ELEM, key, ct.create_string_buffer(value, len(value)))

    def delete(self, key: bytes) -> bool:
        try:
            self._op(BPF_MAP_DELETE_ELEM, key)
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        size = self.spec.key_size
        current = None
        for _ in range(self.spec.max_entries + 1):
            nxt = ct.create_string_buffer(size)
            kbuf = ct.create_string_buffer(current, size) if current is not None else None
            attr = _attr(("I@0", self.fd), ("Q@8", ct.addressof(kbuf) if kbuf is not None else 0),
                         ("Q@16", ct.addressof(nxt)))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break
                raise
            current = nxt.raw
            out.append(current)
        return out

    def percpu_values(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self._stride:i * self._stride + self.spec.value_size] for i in range(self._ncpus)]


def _possible_cpus() -> int:
    """Per-CPU maps hold one value per *possible* CPU (/sys/devices/system/cpu/possible)."""
    try:
        with open("/sys/devices/system/cpu/possible") as fh:
            text = fh.read().strip()
    except OSError:
        return os.cpu_count() or 1
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


# --- the ring buffer, through libbpf ---------------------------------------------------------

_SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class _LibBpf:
    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        lib = ct.CDLL(name, use_errno=True)
        self.new = lib.ring_buffer__new
        self.new.restype = ct.c_void_p
        self.new.argtypes = [ct.c_int, _SAMPLE_FN, ct.c_void_p, ct.c_void_p]
        self.consume = lib.ring_buffer__consume
        self.consume.restype = ct.c_int
        self.consume.argtypes = [ct.c_void_p]
        self.free = lib.ring_buffer__free
        self.free.restype = None
        self.free.argtypes = [ct.c_void_p]
        self.epoll_fd = lib.ring_buffer__epoll_fd
        self.epoll_fd.restype = ct.c_int
        self.epoll_fd.argtypes = [ct.c_void_p]


_libbpf: _LibBpf | None = None


def libbpf() -> _LibBpf:
    global _libbpf
    with _lock:
        if _libbpf is None:
            try:
                _libbpf = _LibBpf()
            except (OSError, AttributeError) as exc:
                raise LoadError(f"libbpf is not available ({exc}): apt-get install libbpf1") from exc
        return _libbpf


class RingBuffer:
    def __init__(self, map_fd: int):
        self._batch: list[bytes] = []

        def collect(_ctx: int, data: int, size: int) -> int:
            self._batch.append(ct.string_at(data, size))
            return 0

        self._callback = _SAMPLE_FN(collect)  # kept: libbpf calls it later
        self._rb = libbpf().new(map_fd, self._callback, None, None)
        if not self._rb:
            raise LoadError(f"ring buffer of map fd {map_fd}: {os.strerror(ct.get_errno())}")

    def drain(self) -> list[bytes]:
        libbpf().consume(self._rb)
        batch, self._batch = self._batch, []
        return batch

    def ready_fd(self) -> int | None:
        """An fd that polls readable when records wait (libbpf's epoll fd)."""
        return libbpf().epoll_fd(self._rb) if self._rb else None

    def close(self) -> None:
        if self._rb:
            libbpf().free(self._rb)
            self._rb = None


# --- a loaded program ----------------------------------------------------------------------------


class LoadedProgram:
    """A CompiledObject in the kernel: its maps created, functions loaded on first use."""

    def __init__(self, name: str, obj: CompiledObject):
        self.name = name
        self.obj = obj
        self.maps: dict[str, BpfMap] = {}
        self.attachments: list[Attachment] = []
        self._prog_fds: dict[str, int] = {}
        self._ring: RingBuffer | None = None
        try:
            for spec in obj.maps:
                self.maps[spec.name] = BpfMap(spec, create_map(spec.type, spec.key_size, spec.value_size,
                                                               spec.max_entries, spec.flags, spec.name))
            for fn in obj.functions:
                category_event = fn.tracepoint
                if category_event:  # TRACEPOINT_PROBE functions attach themselves, as with bcc
                    self.attachments.append(attach_tracepoint(self._load(fn.name), *category_event))
        except BaseException:
            self.close()
            raise

    def _load(self, fn_name: str) -> int:
        fd = self._prog_fds.get(fn_name)
        if fd is None:
            fn = self.obj.function(fn_name)
            insns = relocate(fn, {n: m.fd for n, m in self.maps.items()})
            fd = self._prog_fds[fn_name] = load_function(fn.prog_type, insns, self.obj.license,
                                                        self.obj.kern_version, fn_name)
        return fd

    # --- what the agent calls (attacher.ProgramLike) ---
    def attach_uprobe(self, fn_name: str, path: str, offset: int, *, retprobe: bool = False,
                      ref_ctr_offset: int = 0, label: str = "") -> Attachment:
        try:
            prog_fd = self._load(fn_name)
        except LoadError as exc:
            raise LoadError(f"{self.name}: {exc}") from exc
        att = attach_uprobe(prog_fd, path, offset, retprobe, ref_ctr_offset, label or fn_name)
        self.attachments.append(att)
        return att

    def open_ring_buffer(self, map_name: str = "events") -> None:
        self._ring = RingBuffer(self.maps[map_name].fd)

    def drain(self) -> list[bytes]:
        return self._ring.drain() if self._ring is not None else []

    def ready_fd(self) -> int | None:
        return self._ring.ready_fd() if self._ring is not None else None

    def percpu_sum(self, map_name: str, count: int) -> list[int]:
        m = self.maps[map_name]
        return [sum(int.from_bytes(v, "little") for v in m.percpu_values(struct.pack("<I", i))) for i in range(count)]

    def percpu_value(self, map_name: str, index: int) -> int:
        m = self.maps[map_name]
        return sum(int.from_bytes(v, "little") for v in m.percpu_values(struct.pack("<I", index)))

    def table_items(self, map_name: str) -> list[tuple[object, object]]:
        """(key, value) of every entry, as objects with the fields the agent reads:
        `value` for integer keys and values, `dim`/`bucket` for histogram keys."""
        m = self.maps[map_name]
        out = []
        for key in m.keys():
            value = m.lookup(key)
            if value is not None:
                out.append((_view(key), _view(value)))
        return out

    def set_array_value(self, map_name: str, index: int, value: int) -> None:
        m = self.maps[map_name]
        m.update(struct.pack("<I", index), value.to_bytes(m.spec.value_size, "little"))

    def set_hash_value(self, map_name: str, key: int, value: int) -> None:
        m = self.maps[map_name]
        m.update(key.to_bytes(m.spec.key_size, "little"), value.to_bytes(m.spec.value_size, "little"))

    def key(self, map_name: str, value: int) -> object:
        m = self.maps[map_name]
        return _view(value.to_bytes(m.spec.key_size, "little"))

    def table_delete(self, map_name: str, keys: list[object]) -> int:
        m = self.maps[map_name]
        return sum(1 for k in keys if m.delete(getattr(k, "raw")))

    def detach_all(self) -> None:
        """Close every probe's perf event (each close waits on the kernel, so they run in
        threads), then remove the tracefs events some of them needed."""
        attachments, self.attachments = self.attachments, []

        def close(att: Attachment) -> None:
            try:
                os.close(att.fd)
            except OSError:
                pass

        if len(attachments) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(len(attachments), 16), thread_name_prefix="otel-ebpf-close") as pool:
                list(pool.map(close, attachments))
        else:
            for att in attachments:
                close(att)
        for att in attachments:
            if att.ev_name:
                _remove_event(att.ev_name)

    def close(self) -> None:
        self.detach_all()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for fd in list(self._prog_fds.values()) + [m.fd for m in self.maps.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._prog_fds.clear()
        self.maps.clear()


def _view(raw: bytes) -> SimpleNamespace:
    """A key or value as the agent reads it: `.value` (the leading u64/u32), and for the
    histogram key (struct hist_key) `.dim` and `.bucket`; `.raw` the bytes."""
    value = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else int.from_bytes(raw, "little")
    view = SimpleNamespace(raw=raw, value=value)
    if len(raw) == 16:
        view.dim, view.bucket = struct.unpack_from("<QI", raw)
    return view


def prog_type_of(fn_name: str) -> int:
    return PROG_TRACEPOINT if fn_name.startswith("tracepoint__") else PROG_KPROBE
