"""After compiling, the agent hands back the compiler's pages (libLLVM/libclang are loaded
in-process by bcc and would otherwise stay in its RSS: about 80 MB)."""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from otel_ebpf.bpf import COMPILER_LIBRARIES

PROBE = textwrap.dedent("""
    import ctypes, glob, json, sys
    from otel_ebpf.bpf import COMPILER_LIBRARIES, release_compiler_memory

    def compiler_private_kb():  # pages no other process maps (pytest, our parent, maps some too)
        total, current = 0, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if not fields[0].endswith(":"):
                current = len(fields) >= 6 and bool(COMPILER_LIBRARIES.search(fields[5])) and "x" in fields[1]
            elif fields[0] in ("Private_Clean:", "Private_Dirty:") and current:
                total += int(fields[1])
        return total

    ctypes.CDLL(sys.argv[1])
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and COMPILER_LIBRARIES.search(fields[5]) and "x" in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            for address in range(start, min(end, start + (32 << 20)), 4096):  # what a compile touches
                ctypes.string_at(address, 1)
    before = compiler_private_kb()
    released = release_compiler_memory()
    print(json.dumps({"before": before, "after": compiler_private_kb(), "released": released}))
""")


def compiler_library() -> str:
    for name in ("libLLVM-14.so.1", "libLLVM-15.so.1", "libclang-cpp.so.14"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    pytest.skip("no libLLVM/libclang-cpp on this machine")


def test_compiler_library_names():
    for path in ("/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", "/usr/lib/llvm-14/lib/libclang-cpp.so.14",
                 "/usr/lib/x86_64-linux-gnu/libLLVM-15.0.6.so"):
        assert COMPILER_LIBRARIES.search(path), path
    for path in ("/usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0", "/usr/bin/python3.11",
                 "/usr/lib/x86_64-linux-gnu/libc.so.6", "/opt/libLLVM-data/libc.so.6"):
        assert not COMPILER_LIBRARIES.search(path), path


def test_touched_compiler_pages_leave_the_rss(tmp_path):
    """On a private copy of the library: pages of the system's copy may be mapped by other
    processes too (bpftrace, a compiler child), and shared pages are not ours to give back."""
    import ctypes.util
    import json
    import shutil

    name = compiler_library()
    source = next((p for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
                   if os.path.exists(p := os.path.join(d, name))), None) or ctypes.util.find_library(name)
    copy = tmp_path / os.path.basename(source)
    shutil.copy(source, copy)
    out = subprocess.run([sys.executable, "-c", PROBE, str(copy)], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out)
    assert result["before"] >= 8 * 1024, result  # the loop above made megabytes resident
    assert result["released"] > 0, result
    assert result["after"] <= result["before"] // 10, result
