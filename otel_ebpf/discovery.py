"""Which binary files to attach to, and which processes to watch.

Binaries: configured paths, well-known install paths, the executables of running
processes and the libraries they map. Files are identified by (device, inode), never by
path: two paths to one file are one attach, and a replaced binary (a new inode) is a new
one. The agent calls this again every `rescan_interval_s`, so servers started later and
upgraded binaries are found.

Selectors (as users of the OpenTelemetry eBPF instrumentation know them): executable path
globs, listening TCP ports and containers (id, id prefix or name), each as include and
exclude lists. By default every server of every target on the host is watched. Path
globs choose binaries; ports and containers choose processes, which the kernel then
filters by process id (and their children, followed at fork: PostgreSQL backends, nginx
workers) — see `Selection.pids`.
"""
from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import process
from .config import Config
from .targets.base import Target

Found = tuple[Target, str, process.FileId]


@dataclass(frozen=True)
class Selectors:
    include_exe: tuple[str, ...] = ()
    exclude_exe: tuple[str, ...] = ()
    include_ports: tuple[int, ...] = ()
    exclude_ports: tuple[int, ...] = ()
    include_containers: tuple[str, ...] = ()
    exclude_containers: tuple[str, ...] = ()

    @staticmethod
    def of(config: Config) -> "Selectors":
        return Selectors(config.include_exe, config.exclude_exe, config.include_ports, config.exclude_ports,
                         config.include_containers, config.exclude_containers)

    @property
    def by_process(self) -> bool:
        """Whether processes (not only binaries) are chosen: the kernel then filters by pid."""
        return bool(self.include_ports or self.exclude_ports or self.include_containers or self.exclude_containers)

    def path_allowed(self, path: str) -> bool:
        if self.include_exe and not any(fnmatch.fnmatch(path, g) for g in self.include_exe):
            return False
        return not any(fnmatch.fnmatch(path, g) for g in self.exclude_exe)

    def process_allowed(self, exe: str, ports: set[int], container: str | None,
                        container_name: str | None) -> bool:
        if not self.path_allowed(exe):
            return False
        names = {n for n in (container, container_name) if n}

        def in_containers(wanted: tuple[str, ...]) -> bool:
            return any(n == w or (w and n.startswith(w) and len(w) >= 6) for n in names for w in wanted)

        if self.include_ports and not ports & set(self.include_ports):
            return False
        if self.include_containers and not in_containers(self.include_containers):
            return False
        if ports & set(self.exclude_ports) or in_containers(self.exclude_containers):
            return False
        return True


@dataclass
class Selection:
    """What one discovery pass picked."""

    binaries: list[Found] = field(default_factory=list)
    # With process selectors: the process ids the kernel lets through (allow) or stops
    # (deny), their children added at fork; None: every process of every binary.
    pids: set[int] | None = None
    deny: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why) for doctor


def listening_ports(proc: str = "/proc") -> dict[int, set[int]]:
    """pid -> TCP ports it listens on, from /proc/net/tcp{,6} and each process's sockets."""
    inodes: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{name}") as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                        inodes[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
        except (OSError, ValueError, IndexError):
            continue
    out: dict[int, set[int]] = {}
    if not inodes:
        return out
    for pid in process.all_pids():
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                port = inodes.get(int(link[8:-1]))
                if port is not None:
                    out.setdefault(pid, set()).add(port)
    return out


def container_name(container: str | None, proc: str = "/proc") -> str | None:
    """A Docker container's name from its config (through the host's root when we run in a
    container with pid: host); None when not readable (other runtimes: use the id)."""
    if not container:
        return None
    for root in ("", f"{proc}/1/root"):
        path = f"{root}/var/lib/docker/containers/{container}/config.v2.json"
        try:
            with open(path, encoding="utf-8") as fh:
                name = json.load(fh).get("Name", "")
        except (OSError, ValueError, AttributeError):
            continue
        return name.lstrip("/") or None
    return None


def select_processes(procs: list[process.ProcInfo], selectors: Selectors) -> tuple[set[int], bool, list]:
    """(pids, deny, skipped): with include selectors the pids let through; with exclude
    selectors only, the pids stopped (so that processes started later are watched)."""
    ports = listening_ports() if (selectors.include_ports or selectors.exclude_ports) else {}
    include_only = bool(selectors.include_ports or selectors.include_containers)
    chosen: set[int] = set()
    skipped = []
    for info in procs:
        cid = process.container_id(info.pid)
        name = container_name(cid) if (selectors.include_containers or selectors.exclude_containers) else None
        allowed = selectors.process_allowed(info.exe, ports.get(info.pid, set()), cid, name)
        if allowed == include_only:
            chosen.add(info.pid)
        if not allowed and info.exe:
            skipped.append((f"pid {info.pid} {info.exe}", "not selected"))
    return chosen, not include_only, skipped


def find_binaries(targets: Iterable[Target], config: Config, warn: Callable[[str, str], None]) -> Selection:
    """(target, a path that opens the file, file identity) for every binary to watch.

    `warn(key, message)` is told about configured paths that do not exist."""
    selectors = Selectors.of(config)
    selection = Selection()
    procs = process.processes()
    watched = procs
    if selectors.by_process:
        selection.pids, selection.deny, selection.skipped = select_processes(procs, selectors)
        watched = [p for p in procs if (p.pid in selection.pids) != selection.deny]
    found: dict[tuple[str, process.FileId], Found] = {}
    for target in targets:
        paths = list(config.binaries.get(target.name, ()))
        for p in paths:
            if not os.path.exists(p):
                warn(f"missing:{p}", f"{target.name}: configured binary {p} does not exist")
        if not selectors.by_process or selection.deny:
            paths += target.candidate_paths()
        paths += target.extra_paths(watched)
        for info in watched:
            if info.exe and target.matches_process(info.comm, info.exe):
                # A path in our own mount namespace when it is the same file, else /proc/PID/exe
                # (a deleted binary, or one inside a container).
                paths.append(info.exe if os.path.exists(info.exe) else info.exe_path)
        for p in paths:
            real = p if p.startswith("/proc/") else os.path.realpath(p)
            if not (selectors.path_allowed(p) or selectors.path_allowed(real)):
                selection.skipped.append((p, "excluded by the executable path selectors"))
                continue
            try:
                fid = process.FileId.of(p)
            except OSError:
                continue
            found.setdefault((target.name, fid), (target, p, fid))
    selection.binaries = list(found.values())
    return selection
