"""Read a live process's memory: USDT semaphores and probe-site bytes, to prove attach/detach."""
from __future__ import annotations


def load_base(pid: int, path_suffix: str) -> int:
    """Start of the mapping of a file's offset 0 in a process (the PIE load base)."""
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(path_suffix) and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise LookupError(f"{path_suffix} not mapped in {pid}")


def read(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as fh:
        fh.seek(addr)
        return fh.read(size)
