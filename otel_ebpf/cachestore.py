"""A cache of facts across agent starts: one file per entry in a directory only root
(or the agent's user) may write, each entry checked whole before it counts.

elf.py keeps ELF facts and DWARF offsets here, compiler.py compiled BPF programs. A bad,
stale, truncated, foreign or hostile entry is a miss, never an error and never a wrong
answer: the caller recomputes and stores again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import struct
import tempfile
import time
from typing import Callable

log = logging.getLogger(__name__)

#
# One file per entry, <kind>-<sha256(key)[:40]>.bin in the cache directory:
#   header  "<8sHHqqIQ": magic, format version, kind, source st_size, source st_mtime_ns,
#           key length, payload length
#   digest  sha256(header + key + payload), 32 bytes
#   key     UTF-8: "elf/build-id:<hex>" or "elf/inode:<dev>:<ino>:<size>:<mtime_ns>", "dwarf/..."
#   payload kind-specific: _facts_to_payload for ElfInfo, the offsets as JSON for DWARF
# An entry counts only when all of it checks out: magic, version, kind, exact length,
# digest, key, and (size, mtime_ns) of the file opened now; anything else is a miss and
# the ELF is read again. No pickle: the payload is JSON plus arrays of integers.
# The agent runs as root and the entries decide where uprobes go: a directory or file
# not owned by root or by us, or writable by group/others, is not used (as
# bpf.check_source_safe refuses such C files).

CACHE_ENV = "OTEL_EBPF_CACHE_DIR"  # a directory; set but empty turns the cache off
SYSTEM_CACHE_DIR = "/var/cache/otel-ebpf"
CACHE_MAX_BYTES = 64 << 20  # all entries together; the oldest go first beyond it
_MAGIC = b"OEBPFC\x00\x1a"
_FORMAT_VERSION = 1  # bump when a payload or what goes into it changes
_KIND_ELF, _KIND_DWARF, _KIND_BPF, _KIND_SEARCH = 1, 2, 3, 4
_KIND_NAMES = {_KIND_ELF: "elf", _KIND_DWARF: "dwarf", _KIND_BPF: "bpf", _KIND_SEARCH: "search"}
_HEADER = struct.Struct("<8sHHqqIQ")
_DIGEST_SIZE = 32
_MAX_KEY = 4096
_ENTRY_NAME_RE = re.compile(r"(?:elf|dwarf|bpf|search)-[0-9a-f]{40}\.bin")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600  # a writer that died leaves its temporary file behind


class _Unset:
    """The default of ``cache_dir`` parameters: the directory set_cache_dir or the environment chose."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<module default>"


_UNSET = _Unset()
_chosen_dir: str | None | _Unset = _UNSET
_warned_dirs: set[str] = set()


def set_cache_dir(directory: str | os.PathLike | None | _Unset = _UNSET) -> None:
    """Choose this process's cache directory; None or "" turns the cache off, no argument
    restores the default (``$OTEL_EBPF_CACHE_DIR``, /var/cache/otel-ebpf, the user's cache)."""
    global _chosen_dir
    _chosen_dir = directory if isinstance(directory, _Unset) or directory is None else os.fspath(directory)


def default_cache_dir() -> str | None:
    """``$OTEL_EBPF_CACHE_DIR`` if set ("" = off), else /var/cache/otel-ebpf when we may
    write there, else ``$XDG_CACHE_HOME/otel-ebpf`` or ``~/.cache/otel-ebpf``."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return env or None
    existing = SYSTEM_CACHE_DIR if os.path.isdir(SYSTEM_CACHE_DIR) else os.path.dirname(SYSTEM_CACHE_DIR)
    if os.access(existing, os.W_OK | os.X_OK):
        return SYSTEM_CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore a relative one
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "otel-ebpf")


def _resolve_cache_dir(choice: str | os.PathLike | None | _Unset) -> str | None:
    if isinstance(choice, _Unset):
        choice = _chosen_dir
    if isinstance(choice, _Unset):
        choice = default_cache_dir()
    if choice is None:
        return None
    return os.fspath(choice) or None


def _owned_and_private(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _usable_dir(directory: str, create: bool) -> bool:
    """Whether entries may be read from (and written to) this directory."""
    try:
        if create:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
    except OSError as exc:
        log.debug("cache: %s unusable (%s)", directory, exc)
        return False
    if stat.S_ISDIR(st.st_mode) and _owned_and_private(st):
        return True
    if directory not in _warned_dirs:
        _warned_dirs.add(directory)
        log.warning("cache: not using %s: not a directory, not owned by root or us, or writable "
                    "by group/others (mode %o, uid %d)", directory, st.st_mode & 0o7777, st.st_uid)
    return False


def _entry_path(directory: str, kind: int, key: str) -> str:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
    return os.path.join(directory, f"{_KIND_NAMES[kind]}-{digest}.bin")


def _pack_entry(kind: int, key: str, st: os.stat_result, payload: bytes) -> bytes:
    key_bytes = key.encode("utf-8")
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, kind, st.st_size, st.st_mtime_ns, len(key_bytes), len(payload))
    digest = hashlib.sha256(header + key_bytes + payload).digest()
    return header + digest + key_bytes + payload


def _unpack_entry(blob: bytes, kind: int, key: str, st: os.stat_result) -> bytes:
    """The payload of an entry, or ValueError saying why it does not count."""
    if len(blob) < _HEADER.size + _DIGEST_SIZE:
        raise ValueError("truncated header")
    magic, version, got_kind, size, mtime_ns, key_len, payload_len = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise ValueError("not a cache entry (magic)")
    if version != _FORMAT_VERSION or got_kind != kind:
        raise ValueError(f"format version {version} kind {got_kind}, want {_FORMAT_VERSION} {kind}")
    body = _HEADER.size + _DIGEST_SIZE
    if key_len > _MAX_KEY or len(blob) != body + key_len + payload_len:
        raise ValueError("truncated or overlong")
    view = memoryview(blob)
    digest = hashlib.sha256(view[:_HEADER.size])
    digest.update(view[body:])
    if digest.digest() != blob[_HEADER.size:body]:
        raise ValueError("checksum mismatch")
    if blob[body:body + key_len] != key.encode("utf-8"):
        raise ValueError("another key")
    if (size, mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise ValueError("the file changed since (size or mtime)")
    return blob[body + key_len:]


def _read_entry(directory: str, kind: int, key: str, st: os.stat_result) -> bytes | None:
    """The stored payload for ``key`` if it is there, safe, intact and current; never raises."""
    path = _entry_path(directory, kind, key)
    try:
        if not _usable_dir(directory, create=False):
            return None
        # O_NOFOLLOW: a symlink is not ours; O_NONBLOCK: a FIFO must not hang the agent
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("cache: %s: %s", path, exc)
        return None
    try:
        with open(fd, "rb") as fh:
            entry_st = os.fstat(fh.fileno())
            if not stat.S_ISREG(entry_st.st_mode) or not _owned_and_private(entry_st):
                raise ValueError(f"unsafe entry (mode {entry_st.st_mode & 0o7777:o}, uid {entry_st.st_uid})")
            if entry_st.st_size > CACHE_MAX_BYTES:
                raise ValueError("larger than the whole cache may be")
            payload = _unpack_entry(fh.read(CACHE_MAX_BYTES + 1), kind, key, st)
            _touch(fh.fileno())
            return payload
    except Exception as exc:  # noqa: BLE001 - a bad entry is a miss, whatever is wrong with it
        log.debug("cache: %s: %s; reading the file instead", path, exc)
        return None


def _touch(fd: int) -> None:
    """Mark an entry used: eviction goes by last use. A read-only cache still serves."""
    try:
        os.utime(fd)
    except OSError:
        pass


def _write_entry(directory: str, kind: int, key: str, st: os.stat_result, payload: bytes) -> None:
    """Store atomically (a reader sees the old entry or the new one, never a part)."""
    if not _usable_dir(directory, create=True):
        return
    blob = _pack_entry(kind, key, st, payload)
    if len(blob) > CACHE_MAX_BYTES:
        return
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)  # mode 0600
    try:
        with open(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, _entry_path(directory, kind, key))
    except OSError:
        _unlink_quietly(tmp)
        raise
    _evict(directory, keep=_entry_path(directory, kind, key))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _evict(directory: str, keep: str = "") -> None:
    """Remove the least recently used entries beyond CACHE_MAX_BYTES, and dead temporaries."""
    entries: list[tuple[int, int, str]] = []
    now = time.time()
    with os.scandir(directory) as it:
        for entry in it:
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            if _ENTRY_NAME_RE.fullmatch(entry.name):
                entries.append((st.st_mtime_ns, st.st_size, entry.path))
            elif entry.name.startswith(_TMP_PREFIX) and now - st.st_mtime > _STALE_TMP_SECONDS:
                _unlink_quietly(entry.path)
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= CACHE_MAX_BYTES:
            break
        if path != keep:
            _unlink_quietly(path)
            total -= size


def _store(directory: str, kind: int, key: str, st: os.stat_result, payload: Callable[[], bytes],
           what: str) -> None:
    """Write an entry; a cache that cannot be written only costs the next start time."""
    try:
        _write_entry(directory, kind, key, st, payload())
    except Exception as exc:  # noqa: BLE001 - no failure of the cache may stop the agent
        log.debug("cache: not storing %s (%s: %s)", what, exc.__class__.__name__, exc)




class _NoFile:
    """Entries keyed by content alone (compiled programs) check no source file."""

    st_size = 0
    st_mtime_ns = 0


def load_blob(kind: int, key: str, cache_dir: str | None | _Unset = _UNSET,
              source: os.stat_result | None = None) -> bytes | None:
    """A stored payload, or None. Keyed by content alone, or also checked against the
    `source` file's size and mtime (a file replaced in place is read again)."""
    directory = _resolve_cache_dir(cache_dir)
    return _read_entry(directory, kind, key, source or _NoFile()) if directory else None  # type: ignore[arg-type]


def store_blob(kind: int, key: str, payload: bytes, cache_dir: str | None | _Unset = _UNSET,
               source: os.stat_result | None = None) -> None:
    directory = _resolve_cache_dir(cache_dir)
    if directory:
        _store(directory, kind, key, source or _NoFile(), lambda: payload, key[:40])  # type: ignore[arg-type]
