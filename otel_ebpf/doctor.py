"""`otel-ebpf doctor`: what this host offers, what is missing, what the agent would watch."""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

from .config import Config

# capability bits (linux/capability.h)
CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}
UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"
SYS_BPF = 321  # x86-64
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
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = map_type, key, value, entries
    fd = libc.syscall(SYS_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return False, os.strerror(ctypes.get_errno())
    os.close(fd)
    return True, ""


def kernel_headers() -> tuple[bool, str]:
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.exists(os.path.join(build, "include")):
        return False, f"{build} missing: `make setup` links the nearest Debian linux-headers package there"
    real = os.path.realpath(build)
    same = platform.release() in real
    return True, real + ("" if same else " (fallback headers of another kernel: fine for uprobes/USDT)")


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
    ok, err = _bpf_map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    checks.append(Check("bpf syscall", ok, "maps can be created" if ok else f"bpf(BPF_MAP_CREATE): {err}"))
    ok, err = _bpf_map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096 * 16)
    checks.append(Check("ring buffers", ok, "BPF_MAP_TYPE_RINGBUF works" if ok else f"ring buffer map: {err} (kernel < 5.8?)"))
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
    checks.append(Check("bcc", bpf.bcc is not None,
                        f"bcc {bpf.bcc_version()}" if bpf.bcc is not None
                        else f"not importable ({bpf.BCC_IMPORT_ERROR}); install python3-bpfcc and use a venv "
                             "with --system-site-packages"))
    ok, detail = kernel_headers()
    checks.append(Check("kernel headers", ok, detail))
    return checks


def fatal_problems() -> list[str]:
    return [f"{c.name}: {c.detail}" for c in system_checks() if c.fatal and not c.ok]


def run_doctor(config: Config) -> int:
    checks = system_checks()
    width = max(len(c.name) for c in checks)
    print(f"otel-ebpf doctor — kernel {platform.release()}")
    for c in checks:
        mark = "ok " if c.ok else ("FAIL" if c.fatal else "warn")
        print(f"  [{mark:<4}] {c.name:<{width}}  {c.detail}")
    from .pipeline import Agent
    print("targets:")
    agent = Agent(config)
    found = agent.discover()
    for target in agent.targets:
        mine = [(p, f) for t, p, f in found if t is target]
        if not mine:
            print(f"  {target.name}: no binary found (looked in {', '.join(target.candidate_paths()) or 'running processes'})")
        for path, fid in mine:
            ins = target.inspect(path)
            print(f"  {target.name}: {path} via {ins.mechanism}: {'will attach' if ins.usable else 'cannot attach'}")
            for label, present in ins.probes.items():
                print(f"      {'+' if present else '-'} {label}")
            for note in ins.notes:
                print(f"      note: {note}")
    fatal = [c for c in checks if c.fatal and not c.ok]
    if fatal:
        print(f"cannot run: {'; '.join(c.name for c in fatal)}")
        return 1
    print("ready")
    return 0
