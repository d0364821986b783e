"""What /proc says about processes: executables, environment, container, parents.

Everything here tolerates processes that vanish while being read.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

PROC = "/proc"
_CONTAINER_ID_RE = re.compile(r"([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class FileId:
    """A file on disk, by identity rather than by name (one attach per file)."""

    dev: int
    inode: int

    @staticmethod
    def of(path: str) -> "FileId":
        st = os.stat(path)
        return FileId(st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    exe: str  # path as the process sees it ("" when unreadable)
    exe_path: str  # a path the agent can open: /proc/PID/root/<exe> for other mount namespaces
    start_time: int  # clock ticks since boot: with pid, a process identity


def _read(path: str) -> bytes | None:
    """A whole (/proc) file, in raw reads: the agent reads many small files every few
    seconds, and a buffered file object costs two more system calls each time."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def stat_fields(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start time) from /proc/PID/stat."""
    raw = _read(f"{PROC}/{pid}/stat")
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    close = text.rfind(")")
    comm = text[text.find("(") + 1:close]
    fields = text[close + 2:].split()
    try:
        return comm, int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _exe_link(pid: int) -> str:
    try:
        return os.readlink(f"{PROC}/{pid}/exe")
    except OSError:
        return ""  # a kernel thread, a process that just exited, or not ours to see


def proc_info(pid: int, exe_link: str | None = None) -> ProcInfo | None:
    """`exe_link`: /proc/PID/exe as the caller just read it (else read here)."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    comm, ppid, start = fields
    exe = _exe_link(pid) if exe_link is None else exe_link
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    # /proc/PID/exe opens the running file itself, also for a replaced (deleted) binary
    # and from another mount namespace (a container), so it is the path we attach to.
    exe_path = f"{PROC}/{pid}/exe" if exe else ""
    return ProcInfo(pid, ppid, comm, exe, exe_path, start)


def all_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir(PROC) if n.isdigit()]
    except OSError:
        return []


_seen: dict[int, tuple[str, ProcInfo]] = {}  # pid -> (its exe link as last read, its ProcInfo)


def processes() -> list[ProcInfo]:
    """Every process. The agent asks every few seconds: a pid seen before that still runs
    the same executable keeps its ProcInfo (one readlink, not a read of its stat); one
    that exec'd another program (a container's entrypoint script that execs the server),
    or a pid reused by a new program, is read again."""
    out = []
    seen: dict[int, tuple[str, ProcInfo]] = {}
    for pid in all_pids():
        link = _exe_link(pid)
        known = _seen.get(pid)
        if known is not None and known[0] == link:
            info: ProcInfo | None = known[1]
        else:
            info = proc_info(pid, link)
        if info is not None:
            seen[pid] = (link, info)
            out.append(info)
    _seen.clear()
    _seen.update(seen)
    return out


def environ_value(pid: int, name: str) -> str | None:
    raw = _read(f"{PROC}/{pid}/environ")
    if not raw:
        return None
    prefix = name.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode("utf-8", "replace")
    return None


def environ_values(pid: int, names: tuple[str, ...]) -> dict[str, str]:
    """Several variables of a process's environment, read in one go."""
    raw = _read(f"{PROC}/{pid}/environ")
    if not raw:
        return {}
    prefixes = {name.encode() + b"=": name for name in names}
    out: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        for prefix, name in prefixes.items():
            if entry.startswith(prefix):
                out[name] = entry[len(prefix):].decode("utf-8", "replace")
    return out


def container_id(pid: int) -> str | None:
    """The 64-hex container id from the process's cgroup path, if it runs in one."""
    raw = _read(f"{PROC}/{pid}/cgroup")
    if not raw:
        return None
    for line in raw.decode("utf-8", "replace").splitlines():
        path = line.rsplit(":", 1)[-1]
        m = _CONTAINER_ID_RE.search(path)
        if m:
            return m.group(1)
    return None


def mapped_files(pid: int, name_re: re.Pattern[str], hint: bytes = b"") -> set[str]:
    """Paths of files mapped by a process whose basename matches (e.g. libssl). `hint`:
    bytes every match contains, to skip the parsing of maps that cannot match."""
    raw = _read(f"{PROC}/{pid}/maps")
    if not raw or (hint and hint not in raw):
        return set()
    out: set[str] = set()
    for line in raw.decode("utf-8", "replace").splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and name_re.search(os.path.basename(parts[5])):
            out.add(parts[5])
    return out

