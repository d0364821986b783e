"""Which binary files to attach to: configured paths, well-known install paths, the
executables of running processes and the libraries they map.

Files are identified by (device, inode), never by path: two paths to one file are one
attach, and a replaced binary (a new inode) is a new one. The agent calls this again
every `rescan_interval_s`, so servers started later and upgraded binaries are found.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from . import process
from .targets.base import Target

Found = tuple[Target, str, process.FileId]


def find_binaries(targets: Iterable[Target], configured: dict[str, tuple[str, ...]],
                  warn: Callable[[str, str], None]) -> list[Found]:
    """(target, a path that opens the file, file identity) for every binary to watch.

    `warn(key, message)` is told about configured paths that do not exist."""
    found: dict[tuple[str, process.FileId], Found] = {}
    procs = process.processes()
    for target in targets:
        paths = list(configured.get(target.name, ()))
        for p in paths:
            if not os.path.exists(p):
                warn(f"missing:{p}", f"{target.name}: configured binary {p} does not exist")
        paths += target.candidate_paths()
        paths += target.extra_paths(procs)
        for info in procs:
            if info.exe and target.matches_process(info.comm, info.exe):
                # A path in our own mount namespace when it is the same file, else /proc/PID/exe
                # (a deleted binary, or one inside a container).
                paths.append(info.exe if os.path.exists(info.exe) else info.exe_path)
                paths.append(info.exe_path)
        for p in paths:
            try:
                fid = process.FileId.of(p)
            except OSError:
                continue
            found.setdefault((target.name, fid), (target, p, fid))
    return list(found.values())
