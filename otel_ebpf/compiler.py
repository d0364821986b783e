"""Compiled probe programs: from the cache, or compiled by bcc in a short-lived child
process, then loaded by the agent without the compiler (otel_ebpf/loader.py).

bcc's compiler cannot run in two threads of one process (it crashes), and while it runs
it holds 100-150 MB that a long-running agent should not keep. So each compile is a child
process (`python -m otel_ebpf.compiler`): several run side by side when the machine has
the cores and the memory, their results are stored in the cache directory
(cachestore.py, keyed by everything that goes into the program: its text after the
includes, its -D flags, bcc's version, the kernel release and the kernel headers used),
and the next start loads them in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Callable

from . import bpf, cachestore
from .bpfobject import CompiledObject, ObjectError
from .loader import LoadedProgram, LoadError

log = logging.getLogger(__name__)
COMPILE_TIMEOUT_S = 120.0
CHILD_MEMORY_MB = 160  # what one compile takes at its peak (measured: 120-160 MB)


def cache_key(text: str, cflags: list[str]) -> str:
    """Everything that decides the compiled program: a change in any makes a new entry."""
    digest = hashlib.sha256()
    for part in (text, "\0".join(cflags), bpf.bcc_version(), platform.release(), platform.machine(),
                 os.environ.get("BCC_KERNEL_SOURCE", ""), os.path.realpath(f"/lib/modules/{platform.release()}/build")):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return "bpf/" + digest.hexdigest()


def compile_workers() -> int:
    """How many compiles run side by side: one per core (up to 4), fewer when the agent's
    cgroup has a memory limit the children would not fit in beside it."""
    workers = max(1, min(os.cpu_count() or 1, 4))
    limit = _cgroup_memory_limit()
    if limit is not None:
        workers = max(1, min(workers, (limit // 2**20 - 100) // CHILD_MEMORY_MB))
    return workers


def _cgroup_memory_limit() -> int | None:
    """The memory limit of the agent's cgroup (v2 memory.max, or v1 memory.limit_in_bytes)."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = [line.strip().split(":", 2) for line in fh]
    except OSError:
        return None
    for hierarchy, controllers, path in (line for line in lines if len(line) == 3):
        if hierarchy == "0" and not controllers:
            candidates = [f"/sys/fs/cgroup{path}/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                with open(candidate) as fh:
                    text = fh.read().strip()
            except OSError:
                continue
            if text == "max" or not text.isdigit() or int(text) >= 1 << 60:  # v1's "no limit"
                return None
            return int(text)
    return None


class _Worker:
    """One compiler child serving requests until told to go (`python -m otel_ebpf.compiler
    --serve`): bcc is imported once per child, not once per program."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "otel_ebpf.compiler", "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def compile(self, name: str, text: str, cflags: list[str]) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = json.dumps({"text": text, "cflags": cflags}).encode()
        try:
            self.proc.stdin.write(len(request).to_bytes(4, "little") + request)
            self.proc.stdin.flush()
            header = self.proc.stdout.read(5)
            if len(header) < 5:
                raise EOFError
            ok, size = header[0], int.from_bytes(header[1:], "little")
            body = self.proc.stdout.read(size)
        except (OSError, EOFError) as exc:
            err = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.poll() is not None else ""
            raise bpf.BpfError(f"compiling {name}: the compiler process ended ({err.strip()[-500:] or exc})") from None
        if not ok:
            raise bpf.BpfError(f"compiling {name}: {body.decode('utf-8', 'replace')}")
        return body

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class Compiler:
    """Gets compiled programs: from the cache, else by compiling in child processes (at
    most `workers` at once; callers on several threads wait for their own). `release()`
    ends the children: their compiler's memory goes with them."""

    def __init__(self, workers: int | None = None, cache_dir=cachestore._UNSET):
        self._max = workers or compile_workers()
        self._idle: list[_Worker] = []
        self._count = 0
        self._cv = threading.Condition()
        self._cache_dir = cache_dir
        self.stats = {"cached": 0, "compiled": 0}

    def _take(self) -> _Worker:
        with self._cv:
            while not self._idle and self._count >= self._max:
                self._cv.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return _Worker()
        except OSError as exc:
            with self._cv:
                self._count -= 1
                self._cv.notify()
            raise bpf.BpfError(f"cannot start the compiler process ({exc.strerror})") from exc

    def _give_back(self, worker: _Worker, broken: bool) -> None:
        with self._cv:
            if broken:
                self._count -= 1
            else:
                self._idle.append(worker)
            self._cv.notify()
        if broken:
            worker.close()

    def release(self) -> None:
        """End the idle compiler children (a later compile starts new ones)."""
        with self._cv:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.close()

    def _compile(self, name: str, text: str, cflags: list[str]) -> bytes:
        worker = self._take()
        broken = False
        try:
            return worker.compile(name, text, cflags)
        except bpf.BpfError:
            broken = worker.proc.poll() is not None
            raise
        finally:
            self._give_back(worker, broken)

    def compiled(self, name: str, c_file: str, cflags: list[str]) -> tuple[CompiledObject, bool]:
        """(the program, whether it came from the cache)."""
        text = bpf.source_text(c_file)
        key = cache_key(text, cflags)
        blob = cachestore.load_blob(cachestore._KIND_BPF, key, self._cache_dir)
        if blob is not None:
            try:
                obj = CompiledObject.from_bytes(blob)
                self.stats["cached"] += 1
                return obj, True
            except ObjectError as exc:
                log.debug("%s: cached program unusable (%s): compiling again", name, exc)
        t0 = time.monotonic()
        blob = self._compile(name, text, cflags)
        log.debug("%s: compiled in %.2f s", name, time.monotonic() - t0)
        obj = CompiledObject.from_bytes(blob)
        cachestore.store_blob(cachestore._KIND_BPF, key, blob, self._cache_dir)
        self.stats["compiled"] += 1
        return obj, False

    def __call__(self, name: str, c_file: str, cflags: list[str]) -> LoadedProgram:
        return self.load(name, c_file, cflags)

    def load(self, name: str, c_file: str, cflags: list[str]) -> LoadedProgram:
        """A program ready to attach (attacher.CompileFn)."""
        obj, _ = self.compiled(name, c_file, cflags)
        try:
            return LoadedProgram(name, obj)
        except LoadError as exc:
            raise bpf.BpfError(str(exc)) from exc


def main() -> int:
    """The child (`--serve`): requests (the program's text and -D flags, JSON, after a
    4-byte length) on stdin until it closes; for each, a status byte (1 ok, 0 failed), a
    4-byte length and the compiled program (bpfobject.CompiledObject) or the error."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return 0
        request = json.loads(stdin.read(int.from_bytes(header, "little")))
        try:
            body, ok = bpf.compile_object(request["text"], list(request["cflags"])).to_bytes(), 1
        except bpf.BpfError as exc:
            body, ok = str(exc).encode(), 0
        finally:
            bpf.trim_heap()
        stdout.write(bytes([ok]) + len(body).to_bytes(4, "little") + body)
        stdout.flush()


def loader_available() -> tuple[bool, str]:
    """Whether compiled programs can be loaded without bcc here (libbpf for the ring buffer)."""
    try:
        from .loader import libbpf
        libbpf()
        return True, ""
    except LoadError as exc:
        return False, str(exc)


CompileFn = Callable[[str, str, list[str]], object]


if __name__ == "__main__":
    sys.exit(main())
