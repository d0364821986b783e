"""/proc readings the agent repeats every few seconds: cheap, and never stale across exec."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from otel_ebpf import process


def test_processes_are_read_once_and_again_after_exec():
    child = subprocess.Popen(["/bin/sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        first = {p.pid: p for p in process.processes()}
        assert os.path.realpath(first[os.getpid()].exe) == os.path.realpath(sys.executable)
        assert first[child.pid].exe.endswith("sh")
        again = {p.pid: p for p in process.processes()}
        assert again[os.getpid()] is first[os.getpid()], "a known process is not read again"
        child.stdin.write(b"go\n")
        child.stdin.flush()
        time.sleep(0.3)
        after_exec = {p.pid: p for p in process.processes()}
        assert after_exec[child.pid].exe.endswith("sleep"), "an exec is seen at the next scan"
    finally:
        child.kill()
        child.wait()
    assert child.pid not in {p.pid for p in process.processes()}


def test_raw_reads_return_whole_files():
    maps = process._read(f"/proc/{os.getpid()}/maps")
    assert maps is not None and maps.endswith(b"\n") and maps.count(b"\n") > 10
    assert process._read("/proc/no-such-file") is None
