"""Child processes that are always stopped, a temp dir that is always removed.

Every process a benchmark starts goes through `spawn()` (its own session, so that a
Ctrl-C at the terminal reaches only the bench, which then stops its children in
order) and is registered: `stop_all()` (run at exit and on SIGTERM/SIGHUP) ends the
ones still running, by their own process group ids.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile


class BenchError(Exception):
    """A benchmark cannot go on (a tool is missing, a server did not start, ...)."""


_children: list[subprocess.Popen] = []
_tmp_root: str | None = None
_exit_hooks: list = []


def tmp_dir() -> str:
    """One temp dir for the whole run (logs, scripts); removed at exit."""
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = tempfile.mkdtemp(prefix="otel-ebpf-bench-")
    return _tmp_root


def spawn(argv: list[str], *, env: dict[str, str] | None = None, stdout=None, stderr=None,
          text: bool = True) -> subprocess.Popen:
    """Start a child in its own session (a process group of its own) and remember it."""
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                            text=text, start_new_session=True)
    _children.append(proc)
    return proc


def forget(proc: subprocess.Popen | None) -> None:
    """A child that ended (and was waited for) elsewhere: no longer ours to stop."""
    if proc in _children:
        _children.remove(proc)


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Signal a child started by spawn() (its own process group, by its id), wait, kill if needed."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    forget(proc)
    return proc.returncode


def kill_leftovers(proc: subprocess.Popen | None) -> None:
    """After `proc` (a session leader from spawn()) ended: SIGKILL what is left of its group."""
    if proc is not None and proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def at_exit(hook) -> None:
    """Run `hook()` in stop_all() (restore a setting, remove a cgroup), once."""
    _exit_hooks.append(hook)


def stop_all() -> None:
    for proc in list(_children):
        stop(proc, signal.SIGTERM, timeout=10.0)
    while _exit_hooks:
        with contextlib.suppress(Exception):
            _exit_hooks.pop()()
    if _tmp_root is not None:
        shutil.rmtree(_tmp_root, ignore_errors=True)


def install_cleanup() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C (finally blocks run); children are stopped at exit."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # bpftrace and bcc tools warn without it on kernels that still charge memlock; inherited
    # by every child (no preexec_fn: that forces fork() under gRPC threads).
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    atexit.register(stop_all)


def run(argv: list[str], timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    """A short command to completion (through spawn, so that Ctrl-C stops it too)."""
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        stop(proc, signal.SIGKILL)
        raise
    forget(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def require_tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if path is None:
        raise BenchError(f"{name} is not installed")
    return path
