"""`otel-ebpf doctor`: what this host offers, what is missing, what the agent would watch."""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

from . import kheaders
from .config import Config

# capability bits (linux/capability.h)
CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}
UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"
# bpf(2)'s syscall number per architecture (uname -m): x86-64 has its own table, arm64
# (and riscv64, loongarch64) use the generic one.
BPF_SYSCALL_NUMBERS = {"x86_64": 321, "i386": 357, "i686": 357, "aarch64": 280, "arm64": 280,
                       "armv7l": 386, "riscv64": 280, "loongarch64": 280, "ppc64le": 361, "s390x": 351}


def bpf_syscall_number(machine: str | None = None) -> int | None:
    """bpf(2)'s number on `machine` (default: this one); None when not known here."""
    return BPF_SYSCALL_NUMBERS.get(machine or platform.machine())


SYS_BPF = bpf_syscall_number()  # this machine's, None on an architecture not listed
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF = 2, 27


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = True


def effective_caps() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _bpf_map_create(map_type: int, key: int, value: int, entries: int) -> tuple[bool, str]:
    if SYS_BPF is None:
        return False, f"bpf(2)'s syscall number on {platform.machine()} is not known to doctor"
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = map_type, key, value, entries
    fd = libc.syscall(SYS_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return False, os.strerror(ctypes.get_errno())
    os.close(fd)
    return True, ""


def kernel_header_source() -> kheaders.HeaderSource:
    """The kernel headers bcc will compile against here (see otel_ebpf.kheaders)."""
    return kheaders.find_kernel_headers(platform.release(), os.environ)


def kernel_headers() -> tuple[bool, str]:
    """(found, what was found and what it means / what to do): fatal only when nothing is."""
    source = kernel_header_source()
    if not source.ok:
        return False, source.detail
    env = kheaders.compile_environment(source)
    how = "; ".join(f"compiles with {k}={v}" for k, v in env.items())
    what = source.detail if source.detail.startswith(source.path) else f"{source.path}: {source.detail}"
    return True, f"{source.kind}: {what}" + (f" ({how})" if how else "")


def system_checks() -> list[Check]:
    from . import bpf
    checks: list[Check] = []
    caps = effective_caps()
    missing = [n for n, bit in CAPS.items() if not caps >> bit & 1 and n not in ("CAP_SYS_RESOURCE",)]
    root = os.geteuid() == 0
    has_bpf = caps >> CAPS["CAP_BPF"] & 1 or caps >> CAPS["CAP_SYS_ADMIN"] & 1
    checks.append(Check("privileges", bool(has_bpf and caps >> CAPS["CAP_PERFMON"] & 1 or
                                            caps >> CAPS["CAP_SYS_ADMIN"] & 1),
                        f"euid {os.geteuid()}{' (root)' if root else ''}; "
                        + ("all needed capabilities" if not missing else f"missing {', '.join(missing)}")))
    # Probed with a raw bpf(2) call; on an architecture whose syscall number doctor does not
    # know, say so without failing: bcc itself does not need doctor's table.
    known = SYS_BPF is not None
    ok, err = _bpf_map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    checks.append(Check("bpf syscall", ok, "maps can be created" if ok else f"bpf(BPF_MAP_CREATE): {err}",
                        fatal=known))
    ok, err = _bpf_map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096 * 16)
    checks.append(Check("ring buffers", ok, "BPF_MAP_TYPE_RINGBUF works" if ok
                        else f"ring buffer map: {err}" + (" (kernel < 5.8?)" if known else ""), fatal=known))
    checks.append(Check("BTF", os.path.exists("/sys/kernel/btf/vmlinux"),
                        "/sys/kernel/btf/vmlinux" if os.path.exists("/sys/kernel/btf/vmlinux")
                        else "no /sys/kernel/btf/vmlinux (not needed by the uprobe/USDT targets)", fatal=False))
    checks.append(Check("uprobes", os.path.exists(f"{UPROBE_PMU}/type"),
                        "uprobe perf PMU present" if os.path.exists(f"{UPROBE_PMU}/type")
                        else "no uprobe PMU (kernel built without CONFIG_UPROBE_EVENTS?)"))
    ref = os.path.exists(f"{UPROBE_PMU}/format/ref_ctr_offset")
    checks.append(Check("uprobe ref_ctr_offset", ref,
                        "the kernel manages USDT semaphores" if ref
                        else "kernel < 4.20: USDT probes with semaphores (PostgreSQL's) cannot fire"))
    tracefs = next((p for p in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events")
                    if os.path.exists(p)), None)
    checks.append(Check("tracefs", tracefs is not None,
                        tracefs or "not mounted: mount -t tracefs tracefs /sys/kernel/tracing", fatal=False))
    bcc_ok, bcc_why = bpf.bcc_available()
    checks.append(Check("bcc", bcc_ok, f"bcc {bpf.bcc_version()} (compiles the probes in a child process)" if bcc_ok
                        else f"{bcc_why}: install python3-bpfcc and use a venv with --system-site-packages"))
    from .compiler import loader_available
    loader_ok, loader_why = loader_available()
    checks.append(Check("libbpf", loader_ok, "the agent loads compiled probes itself (no compiler in its process)"
                        if loader_ok else f"{loader_why}: the agent then compiles in its own process",
                        fatal=False))
    ok, detail = kernel_headers()
    checks.append(Check("kernel headers", ok, detail))
    return checks


def fatal_problems() -> list[str]:
    return [f"{c.name}: {c.detail}" for c in system_checks() if c.fatal and not c.ok]


def run_doctor(config: Config, timings: bool = False) -> int:
    checks = system_checks()
    width = max(len(c.name) for c in checks)
    print(f"otel-ebpf doctor — kernel {platform.release()}")
    for c in checks:
        mark = "ok " if c.ok else ("FAIL" if c.fatal else "warn")
        print(f"  [{mark:<4}] {c.name:<{width}}  {c.detail}")
    fatal = [c for c in checks if c.fatal and not c.ok]
    from .report import print_targets
    problems = print_targets(config, timings=timings and not fatal)
    if fatal:
        print(f"cannot run: {'; '.join(c.name for c in fatal)}")
        return 1
    if problems:
        print(f"cannot run: {'; '.join(problems)}")
        return 2
    print("ready")
    return 0
