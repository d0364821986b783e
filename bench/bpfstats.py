"""The BPF programs' own run time: what a tool's programs cost inside the traced process.

With BPF statistics on (`kernel.bpf_stats_enabled`), the kernel adds every run of every
program to its `run_time_ns` and `run_cnt` (struct bpf_prog_info; also in the fdinfo of a
program's file descriptor). A tool's programs are the ones it holds open: the agent's
(named after their C functions: on_query_done, on_request_end, ...) in the agent
process, bpftrace's in the bpftrace process.

`BpfStats()` turns statistics on for as long as it is open: through the bpf() command
BPF_ENABLE_STATS (the kernel turns them off again when its file descriptor is closed,
also if the bench dies), else through the sysctl, restored to its old value on close.
`programs_of(pid)` reads a process's programs; `usage(before, after)` is the difference.
"""
from __future__ import annotations

import ctypes as ct
import os
import platform
import re
from dataclasses import dataclass

SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
BPF_OBJ_NAME_LEN = 16


class BpfProgInfo(ct.Structure):
    """struct bpf_prog_info of <linux/bpf.h> up to run_cnt (the kernel fills what we ask for)."""

    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * BPF_OBJ_NAME_LEN), ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64),
    ]


class _InfoAttr(ct.Structure):  # union bpf_attr, .info
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _IdAttr(ct.Structure):  # union bpf_attr, BPF_*_GET_FD_BY_ID
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _StatsAttr(ct.Structure):  # union bpf_attr, .enable_stats
    _fields_ = [("type", ct.c_uint32)]


_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def _bpf(cmd: int, attr: ct.Structure) -> int:
    if SYS_BPF is None:
        raise OSError(0, f"no bpf() system call number known for {platform.machine()}")
    # The kernel zero-checks the bytes past what a command uses: pass a zeroed 128-byte attr.
    buf = ct.create_string_buffer(128)
    ct.memmove(buf, ct.addressof(attr), ct.sizeof(attr))
    r = _libc.syscall(SYS_BPF, cmd, buf, ct.sizeof(buf))
    if r < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return r


@dataclass(frozen=True)
class ProgStat:
    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int


def prog_info(prog_id: int) -> ProgStat:
    """A program's name and run statistics by its id (CAP_SYS_ADMIN)."""
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    try:
        info = BpfProgInfo()
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
    finally:
        os.close(fd)
    return ProgStat(prog_id, info.name.decode("utf-8", "replace"), info.run_time_ns, info.run_cnt)


_FDINFO_RE = re.compile(r"^(prog_id|prog_tag|run_time_ns|run_cnt):\s*(\S+)", re.M)


def parse_fdinfo(text: str) -> dict[str, str]:
    """The fields of a BPF program's /proc/PID/fdinfo/FD this module uses."""
    return dict(_FDINFO_RE.findall(text))


def programs_of(pid: int) -> dict[int, ProgStat]:
    """The BPF programs process `pid` holds open, by program id (each once, however many fds)."""
    out: dict[int, ProgStat] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                fields = parse_fdinfo(fh.read())
        except OSError:
            continue
        if "prog_id" not in fields:
            continue
        prog_id = int(fields["prog_id"])
        if prog_id in out:
            continue
        try:
            out[prog_id] = prog_info(prog_id)
        except OSError:  # no name then: the tag, and fdinfo's counters
            out[prog_id] = ProgStat(prog_id, fields.get("prog_tag", "?")[:8], int(fields.get("run_time_ns", 0)),
                                    int(fields.get("run_cnt", 0)))
    return out


@dataclass(frozen=True)
class ProgUsage:
    name: str
    run_time_ns: int
    run_cnt: int

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / self.run_cnt if self.run_cnt else float("nan")


def usage(before: dict[int, ProgStat], after: dict[int, ProgStat]) -> list[ProgUsage]:
    """Per program of `after`: run time and runs between the two readings, busiest first;
    programs that did not run are left out. Programs of one name (bpftrace names a
    uprobe and a uretprobe on one function alike) are told apart as name, name#2, ..."""
    out = []
    for prog_id, st in sorted(after.items()):
        b = before.get(prog_id)
        d_cnt = st.run_cnt - (b.run_cnt if b else 0)
        if d_cnt > 0:
            out.append(ProgUsage(st.name, st.run_time_ns - (b.run_time_ns if b else 0), d_cnt))
    seen: dict[str, int] = {}
    named = []
    for p in out:
        seen[p.name] = seen.get(p.name, 0) + 1
        named.append(p if seen[p.name] == 1 else ProgUsage(f"{p.name}#{seen[p.name]}", p.run_time_ns, p.run_cnt))
    return sorted(named, key=lambda p: -p.run_time_ns)


def per_operation(progs: list[ProgUsage], operations: int) -> tuple[float, float]:
    """(BPF ns per operation, program runs per operation) over all of a tool's programs."""
    if operations <= 0:
        return float("nan"), float("nan")
    return (sum(p.run_time_ns for p in progs) / operations, sum(p.run_cnt for p in progs) / operations)


def describe(progs: list[ProgUsage], operations: int) -> str:
    """'on_query_done 1.21 µs × 1.00, ...' per program: its time per run, runs per operation."""
    return ", ".join(f"{p.name} {p.ns_per_run / 1000:.2f} µs × {p.run_cnt / max(operations, 1):.2f}"
                     for p in progs)


class BpfStats:
    """BPF run-time statistics on while open (see the module's docstring)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.restore: str | None = None
        self.how = "off"

    def open(self) -> "BpfStats":
        try:
            self.fd = _bpf(BPF_ENABLE_STATS, _StatsAttr(type=BPF_STATS_RUN_TIME))
            self.how = "BPF_ENABLE_STATS"
            return self
        except OSError:
            pass
        try:
            with open(SYSCTL) as fh:
                old = fh.read().strip()
            if old != "1":
                with open(SYSCTL, "w") as fh:
                    fh.write("1")
                self.restore = old
            self.how = f"sysctl kernel.bpf_stats_enabled=1 (was {old})"
        except OSError as exc:
            self.how = f"off ({exc.strerror})"
        return self

    @property
    def enabled(self) -> bool:
        return self.how != "off" and not self.how.startswith("off ")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.restore is not None:
            try:
                with open(SYSCTL, "w") as fh:
                    fh.write(self.restore)
            except OSError:
                pass
            self.restore = None

    def __enter__(self) -> "BpfStats":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
