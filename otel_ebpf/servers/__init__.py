"""Throwaway local servers (temp dir, free port) for `otel-ebpf demo` and the tests."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time


class ServerError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise ServerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def run_as(user: str | None, argv: list[str], env: dict[str, str] | None = None,
           **kw) -> subprocess.CompletedProcess:
    """Run a command, as `user` when we are root (servers refuse to run as root)."""
    if user and os.geteuid() == 0:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]
    full_env = {**os.environ, **env} if env else None
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, **kw)


def chown_tree(path: str, user: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


def which(name: str, *extra_dirs: str) -> str | None:
    for d in extra_dirs:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)
