"""Integration prerequisites: skip on a developer machine, fail under CI (CI=true)."""
from __future__ import annotations

import os
import platform
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"integration prerequisite missing under CI: {what} (make setup installs it)", pytrace=False)
    pytest.skip(what)


def require_ebpf() -> None:
    require(os.geteuid() == 0, "root is needed to attach eBPF probes")
    try:
        import bcc  # noqa: F401
        ok, why = True, ""
    except Exception as exc:  # noqa: BLE001
        ok, why = False, str(exc)
    require(ok, f"bcc is not importable ({why}): apt-get install python3-bpfcc, venv with --system-site-packages")
    require(os.path.exists(f"/lib/modules/{platform.release()}/build/include"),
            f"kernel headers missing at /lib/modules/{platform.release()}/build")


def require_binary(name: str, path: str | None = None) -> str:
    found = path if path and os.path.exists(path) else shutil.which(name)
    require(found is not None, f"{name} is not installed")
    return found  # type: ignore[return-value]
