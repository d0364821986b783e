"""Integration prerequisites: skip on a developer machine, fail under CI (CI=true)."""
from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"integration prerequisite missing under CI: {what} (make setup installs it)", pytrace=False)
    pytest.skip(what)


@functools.cache
def _bcc_importable() -> tuple[bool, str]:
    """Checked in a child process: bcc's libraries (LLVM) take the static TLS room that
    client libraries loaded later in this process need (mysql-connector's C extension)."""
    r = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def require_ebpf() -> None:
    require(os.geteuid() == 0, "root is needed to attach eBPF probes")
    ok, why = _bcc_importable()
    require(ok, f"bcc is not importable ({why}): apt-get install python3-bpfcc, venv with --system-site-packages")
    require(os.path.exists(f"/lib/modules/{platform.release()}/build/include"),
            f"kernel headers missing at /lib/modules/{platform.release()}/build")


def require_binary(name: str, path: str | None = None) -> str:
    found = path if path and os.path.exists(path) else shutil.which(name)
    require(found is not None, f"{name} is not installed")
    return found  # type: ignore[return-value]
