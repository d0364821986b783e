"""The persistent cache of ElfInfo and DWARF answers: a hit gives what a read gives, and no
bad, stale, foreign or hostile entry ever raises or gives a wrong answer (it is a miss)."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
import subprocess
import time

import pytest

from otel_ebpf import cachestore, elf
from otel_ebpf.elf import ElfInfo
from tests.support.prereq import require

POSTGRES = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
SMALL_ELF = shutil.which("true") or "/bin/true"  # coreutils: on every host, has a build id
OTHER_ELF = shutil.which("ls") or "/bin/ls"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test writes the host's cache, and none sees another's in-process memo."""
    monkeypatch.setenv("OTEL_EBPF_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setattr(cachestore, "_chosen_dir", cachestore._UNSET)
    elf._cached.cache_clear()
    yield
    elf._cached.cache_clear()


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def binary(tmp_path) -> str:
    """A copy we may touch, rewrite and replace."""
    path = tmp_path / "prog"
    shutil.copy2(SMALL_ELF, path)
    return str(path)


def facts_of(info: ElfInfo) -> tuple:
    return (info.machine, info.is_pie, info.has_symtab, info.has_dwarf, info._loads,
            list(info._symbols.items()), info.probes)


def entries(cache: str, kind: str = "elf") -> list[str]:
    return sorted(glob.glob(os.path.join(cache, f"{kind}-*.bin")))


def only_entry(cache: str, kind: str = "elf") -> str:
    found = entries(cache, kind)
    assert len(found) == 1, found
    return found[0]


def rewrite_header(path: str, **fields) -> None:
    """Change header fields and recompute the digest, so only those fields are wrong."""
    with open(path, "rb") as fh:
        blob = fh.read()
    names = ("magic", "version", "kind", "size", "mtime_ns", "key_len", "payload_len")
    header = dict(zip(names, elf._HEADER.unpack_from(blob)))
    header.update(fields)
    body = blob[elf._HEADER.size + elf._DIGEST_SIZE:]
    packed = elf._HEADER.pack(*(header[n] for n in names))
    with open(path, "wb") as fh:
        fh.write(packed + hashlib.sha256(packed + body).digest() + body)


# --- round trip --------------------------------------------------------------------

def test_round_trip_gives_what_a_read_gives(binary, cache):
    cold = ElfInfo.load(binary, cache_dir=cache)
    assert not cold.from_cache and len(entries(cache)) == 1
    warm = ElfInfo.load(binary, cache_dir=cache)
    assert warm.from_cache
    assert facts_of(warm) == facts_of(cold) == facts_of(ElfInfo(binary))
    some = next(iter(cold._symbols))
    assert warm.symbol(some) == cold.symbol(some) and warm.symbol("no such symbol") is None
    st = os.stat(only_entry(cache))
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(os.stat(cache).st_mode) == 0o700


def test_disabled_cache_writes_nothing(binary, tmp_path):
    for off in (None, ""):
        assert not ElfInfo.load(binary, cache_dir=off).from_cache
    assert not os.path.exists(tmp_path / "default-cache")


def test_elf_info_uses_the_chosen_directory(binary, cache, tmp_path):
    elf_info = elf.elf_info
    assert not elf_info(binary, cache_dir=cache).from_cache and len(entries(cache)) == 1
    elf._cached.cache_clear()
    assert elf_info(binary, cache_dir=cache).from_cache
    elf._cached.cache_clear()
    elf_info(binary)  # the environment's choice
    assert len(entries(str(tmp_path / "default-cache"))) == 1
    chosen = str(tmp_path / "chosen")
    elf.set_cache_dir(chosen)
    elf._cached.cache_clear()
    elf_info(binary)
    assert len(entries(chosen)) == 1
    elf.set_cache_dir(None)
    assert elf.elf_info(OTHER_ELF).from_cache is False and len(entries(chosen)) == 1
    elf.set_cache_dir()  # back to the environment's choice
    elf._cached.cache_clear()
    assert elf.elf_info(OTHER_ELF).from_cache is False
    assert len(entries(str(tmp_path / "default-cache"))) == 2


def test_a_read_only_cache_still_serves(binary, cache, monkeypatch):
    ElfInfo.load(binary, cache_dir=cache)

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cachestore.os, "utime", read_only)
    monkeypatch.setattr(cachestore.tempfile, "mkstemp", read_only)
    assert ElfInfo.load(binary, cache_dir=cache).from_cache
    assert not ElfInfo.load(OTHER_ELF, cache_dir=cache).from_cache  # and a miss is only a miss


def test_no_failure_inside_the_cache_reaches_the_caller(binary, cache, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the cache")

    with monkeypatch.context() as m:
        m.setattr(cachestore, "_pack_entry", broken)
        assert not ElfInfo.load(binary, cache_dir=cache).from_cache and not entries(cache)
    ElfInfo.load(binary, cache_dir=cache)
    with monkeypatch.context() as m:
        m.setattr(cachestore, "_unpack_entry", broken)
        assert facts_of(ElfInfo.load(binary, cache_dir=cache)) == facts_of(ElfInfo(binary))


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("OTEL_EBPF_CACHE_DIR", "")
    assert elf.default_cache_dir() is None
    monkeypatch.delenv("OTEL_EBPF_CACHE_DIR")
    monkeypatch.setattr(cachestore, "SYSTEM_CACHE_DIR", str(tmp_path / "var-cache" / "otel-ebpf"))
    (tmp_path / "var-cache").mkdir()
    assert elf.default_cache_dir() == str(tmp_path / "var-cache" / "otel-ebpf")
    monkeypatch.setattr(cachestore.os, "access", lambda *_: False)  # /var/cache not writable by us
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert elf.default_cache_dir() == str(tmp_path / "xdg" / "otel-ebpf")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert elf.default_cache_dir() == str(tmp_path / "home" / ".cache" / "otel-ebpf")


def test_a_hit_is_much_faster_than_a_read(cache):
    path = POSTGRES[-1] if POSTGRES else None
    require(path is not None, "PostgreSQL is not installed")
    ElfInfo.load(path, cache_dir=cache)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    cold = best(lambda: ElfInfo.load(path, cache_dir=None))
    warm = best(lambda: ElfInfo.load(path, cache_dir=cache))
    assert warm * 2 < cold, (warm, cold)  # ~4x here; bench/elf_bench.py measures it properly


# --- entries that must be misses ------------------------------------------------------

def corrupt_truncate(path: str, other: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def corrupt_header_only(path: str, other: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(10)


def corrupt_empty(path: str, other: str) -> None:
    open(path, "wb").close()


def corrupt_magic(path: str, other: str) -> None:
    rewrite_header(path, magic=b"NOTOURS\0")


def corrupt_version(path: str, other: str) -> None:
    rewrite_header(path, version=elf._FORMAT_VERSION + 1)


def corrupt_kind(path: str, other: str) -> None:
    rewrite_header(path, kind=elf._KIND_DWARF)


def corrupt_checksum(path: str, other: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0x20]))


def corrupt_trailing_garbage(path: str, other: str) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)


def corrupt_key(path: str, other: str) -> None:
    """Another binary's entry under this binary's name, made to look current (same size and
    mtime, valid checksum): only its key tells, and its answers must not be used."""
    with open(path, "rb") as fh:
        _, _, _, size, mtime_ns, _, _ = elf._HEADER.unpack_from(fh.read(elf._HEADER.size))
    shutil.copyfile(other, path)
    rewrite_header(path, size=size, mtime_ns=mtime_ns)


def corrupt_stale_header(path: str, other: str) -> None:
    rewrite_header(path, mtime_ns=12345)


def corrupt_payload_with_valid_checksum(path: str, other: str) -> None:
    """A writer bug (or a future format under the same version): valid checksum, nonsense payload."""
    with open(path, "rb") as fh:
        blob = fh.read()
    _, _, _, _, _, key_len, _ = elf._HEADER.unpack_from(blob)
    start = elf._HEADER.size + elf._DIGEST_SIZE
    key = blob[start:start + key_len]
    payload = b"\x05\0\0\0{}[]!" + b"\xff" * 40
    packed = elf._HEADER.pack(*elf._HEADER.unpack_from(blob)[:6], len(payload))
    with open(path, "wb") as fh:
        fh.write(packed + hashlib.sha256(packed + key + payload).digest() + key + payload)


@pytest.mark.parametrize("damage", [
    corrupt_truncate, corrupt_header_only, corrupt_empty, corrupt_magic, corrupt_version, corrupt_kind,
    corrupt_checksum, corrupt_trailing_garbage, corrupt_key, corrupt_stale_header,
    corrupt_payload_with_valid_checksum,
], ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_a_bad_entry_is_read_again_and_replaced(binary, cache, tmp_path, damage):
    expected = facts_of(ElfInfo.load(binary, cache_dir=cache))
    entry = only_entry(cache)
    other_cache = str(tmp_path / "other")
    ElfInfo.load(OTHER_ELF, cache_dir=other_cache)
    damage(entry, only_entry(other_cache))
    again = ElfInfo.load(binary, cache_dir=cache)
    assert not again.from_cache and facts_of(again) == expected
    assert ElfInfo.load(binary, cache_dir=cache).from_cache  # the read rewrote the entry


def test_a_binary_replaced_in_place_is_read_again(binary, cache):
    """Same inode, same build id (the content is equal), but a new mtime: not trusted."""
    first = ElfInfo.load(binary, cache_dir=cache)
    ino = os.stat(binary).st_ino
    st = os.stat(binary)
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    again = ElfInfo.load(binary, cache_dir=cache)
    assert os.stat(binary).st_ino == ino and not again.from_cache and facts_of(again) == facts_of(first)


def test_a_binary_rewritten_in_place_gives_the_new_answers(binary, cache):
    before = ElfInfo.load(binary, cache_dir=cache)
    ino = os.stat(binary).st_ino
    with open(OTHER_ELF, "rb") as src, open(binary, "r+b") as dst:  # same inode, new bytes
        dst.truncate(0)
        shutil.copyfileobj(src, dst)
    after = ElfInfo.load(binary, cache_dir=cache)
    assert os.stat(binary).st_ino == ino and not after.from_cache
    assert facts_of(after) == facts_of(ElfInfo(OTHER_ELF)) != facts_of(before)


def test_without_build_id_the_inode_and_mtime_are_the_key(tmp_path, cache):
    objcopy = shutil.which("objcopy")
    require(objcopy is not None, "objcopy (binutils) is not installed")
    plain = tmp_path / "no-build-id"
    subprocess.run([objcopy, "--remove-section", ".note.gnu.build-id", SMALL_ELF, str(plain)], check=True)
    with open(plain, "rb") as fh:
        assert elf.read_build_id(fh) is None
    assert not ElfInfo.load(str(plain), cache_dir=cache).from_cache
    assert ElfInfo.load(str(plain), cache_dir=cache).from_cache
    with open(plain, "ab") as fh:  # same inode, new size and mtime
        fh.write(b"\0" * 8)
    assert not ElfInfo.load(str(plain), cache_dir=cache).from_cache


# --- unsafe places --------------------------------------------------------------------

def test_a_directory_writable_by_others_is_not_used(binary, cache):
    ElfInfo.load(binary, cache_dir=cache)
    os.chmod(cache, 0o777)
    entry = only_entry(cache)
    before = os.stat(entry).st_mtime_ns
    again = ElfInfo.load(binary, cache_dir=cache)
    assert not again.from_cache and os.stat(entry).st_mtime_ns == before  # neither read nor written


def test_a_directory_of_another_user_is_not_used(binary, cache):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    ElfInfo.load(binary, cache_dir=cache)
    os.chown(cache, 65534, 65534)
    assert not ElfInfo.load(binary, cache_dir=cache).from_cache


@pytest.mark.parametrize("how", ["group-writable", "symlink", "fifo", "directory"])
def test_an_unsafe_entry_is_not_used(binary, cache, tmp_path, how):
    expected = facts_of(ElfInfo.load(binary, cache_dir=cache))
    entry = only_entry(cache)
    if how == "group-writable":
        os.chmod(entry, 0o664)
    else:
        elsewhere = tmp_path / "elsewhere.bin"
        shutil.move(entry, elsewhere)
        {"symlink": lambda: os.symlink(elsewhere, entry), "fifo": lambda: os.mkfifo(entry),
         "directory": lambda: os.mkdir(entry)}[how]()
    again = ElfInfo.load(binary, cache_dir=cache)  # a FIFO must not block either
    assert not again.from_cache and facts_of(again) == expected


def test_a_cache_path_that_is_a_file_or_unwritable_only_costs_time(binary, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert not ElfInfo.load(binary, cache_dir=str(blocker)).from_cache
    assert not ElfInfo.load(binary, cache_dir=str(blocker / "below")).from_cache


def test_size_is_bounded_oldest_out(cache, monkeypatch, tmp_path):
    paths = []
    for i, source in enumerate((SMALL_ELF, OTHER_ELF, shutil.which("cat") or "/bin/cat")):
        copy = tmp_path / f"bin{i}"
        shutil.copy2(source, copy)
        paths.append(str(copy))
    ElfInfo.load(paths[0], cache_dir=cache)
    one = os.path.getsize(only_entry(cache))
    os.utime(only_entry(cache), ns=(1, 1))  # long unused
    stale_tmp = os.path.join(cache, elf._TMP_PREFIX + "dead")
    open(stale_tmp, "wb").close()
    os.utime(stale_tmp, ns=(1, 1))
    ElfInfo.load(paths[1], cache_dir=cache)
    monkeypatch.setattr(cachestore, "CACHE_MAX_BYTES", sum(os.path.getsize(e) for e in entries(cache)) - one + 1)
    ElfInfo.load(paths[2], cache_dir=cache)
    assert sum(os.path.getsize(e) for e in entries(cache)) <= elf.CACHE_MAX_BYTES
    assert ElfInfo.load(paths[2], cache_dir=cache).from_cache  # the newest stays
    assert not ElfInfo.load(paths[0], cache_dir=cache).from_cache  # the oldest went
    assert not os.path.exists(stale_tmp)


# --- PostgreSQL: what the probes are compiled with is unchanged -----------------------

# Recorded with the code before the bulk reader, the cache and arm64 (pyelftools symbol
# iteration, x86-64 only), on postgresql-15 whose build id this is.
PG15_BUILD_ID = "44c007cfee140e4c25e8a434008096828e70a92c"
PG15_PROBES_SHA256 = "834b0b88afc8f9d98028f84a055457546ee2bf74597bf97b6798f94805407896"
PG15_MACROS_SHA256 = "e1e1fb60482b4ebdc74b537104f2133e9b2ae5964dee4f0cc10da0aec1c27497"
PG15_MACROS = {
    "query__start:1": "((u64)(u64)(u64)ctx->bx)",
    "query__done:1": "({ s64 __v = 0; bpf_probe_read_user(&__v, sizeof(__v), (void *)(ctx->bp + (-144LL))); "
                     "((u64)(u64)(u64)__v); })",
    "buffer__sync__done:1": "({ s32 __v = 0; bpf_probe_read_user(&__v, sizeof(__v), "
                            "(void *)(ctx->ip - 4465016ULL + 8871804ULL)); ((u64)(s64)(s32)__v); })",
    "lwlock__wait__start:2": "((ctx->ip & 0xfff) == 0x752 ? ((u64)(0LL)) : ((ctx->ip & 0xfff) == 0x5b6 ? "
                             "((u64)(u64)(u32)ctx->r14) : ((ctx->ip & 0xfff) == 0x322 ? "
                             "((u64)(u64)(u32)ctx->r14) : 0ULL)))",
    "clog__checkpoint__start:1": "((u64)(1LL))",
}


def all_macros(info: ElfInfo) -> dict[str, str]:
    out = {}
    for p in info.probes:
        for i in range(1, len(p.args) + 1):
            out[f"{p.provider}:{p.name}:{i}"] = info.usdt_arg_macro(p.provider, p.name, i)
    return out


def probes_digest(info: ElfInfo) -> str:
    lines = sorted(
        f"{p.provider}:{p.name}:{p.pc}:{p.file_offset}:{p.semaphore}:{p.semaphore_offset}:{p.arg_string}:"
        + "|".join(f"{a.kind},{a.size},{a.reg},{a.index_reg},{a.scale},{a.disp},{a.symbol}" for a in p.args)
        for p in info.probes)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_postgres_notes_and_macros_unchanged(cache):
    require(bool(POSTGRES), "PostgreSQL is not installed")
    path = POSTGRES[-1]
    cold = ElfInfo.load(path, cache_dir=cache)
    warm = ElfInfo.load(path, cache_dir=cache)
    assert warm.from_cache and warm.probes == cold.probes and all_macros(warm) == all_macros(cold)
    with open(path, "rb") as fh:
        build_id = elf.read_build_id(fh)
    if build_id != PG15_BUILD_ID:
        pytest.skip(f"{path} is not the postgresql-15 build the outputs were recorded on")
    macros = all_macros(cold)
    assert {k: macros[f"postgresql:{k}"] for k in PG15_MACROS} == PG15_MACROS
    blob = "\n".join(f"{k}={v}" for k, v in sorted(macros.items()))
    assert hashlib.sha256(blob.encode()).hexdigest() == PG15_MACROS_SHA256
    assert probes_digest(cold) == probes_digest(warm) == PG15_PROBES_SHA256


# --- DWARF answers --------------------------------------------------------------------

STRUCTS_C = """
struct inner { int a; long b; };
typedef struct outer { char c; struct inner in; unsigned bits : 3; } outer_t;
outer_t g;
int main(void) { return g.c; }
"""
WANTED = {"outer_t": ("c", "in.b", "bits", "missing")}
EXPECTED = {"outer_t": {"c": 0, "in.b": 16}}


@pytest.fixture(scope="module")
def with_dwarf(tmp_path_factory) -> str:
    cc = shutil.which("cc")
    require(cc is not None, "a C compiler (gcc) is not installed")
    out = tmp_path_factory.mktemp("dwarf")
    (out / "structs.c").write_text(STRUCTS_C)
    subprocess.run([cc, "-g", "-O0", "-o", str(out / "structs"), str(out / "structs.c")], check=True)
    return str(out / "structs")


@pytest.fixture
def dwarf_copy(with_dwarf, tmp_path) -> str:
    path = tmp_path / "structs"
    shutil.copy2(with_dwarf, path)
    return str(path)


def no_dwarf_reading(*_args, **_kwargs):
    raise AssertionError("the DWARF was read although the cache held the answer")


def test_dwarf_answers_are_cached(dwarf_copy, cache, monkeypatch):
    assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache) == (dwarf_copy, EXPECTED)
    assert len(entries(cache, "dwarf")) == 1
    with monkeypatch.context() as m:
        m.setattr(elf, "_read_member_offsets", no_dwarf_reading)
        assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache) == (dwarf_copy, EXPECTED)
    # another question is another entry
    assert elf.dwarf_member_offsets(dwarf_copy, {"outer_t": ("c",)}, cache_dir=cache)[1] == {"outer_t": {"c": 0}}
    assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cu_hint="structs.c", cache_dir=cache)[1] == EXPECTED
    assert len(entries(cache, "dwarf")) == 3


def test_dwarf_cache_off_and_default(dwarf_copy, tmp_path):
    assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=None)[1] == EXPECTED
    assert elf.dwarf_member_offsets(dwarf_copy, WANTED)[1] == EXPECTED
    assert len(entries(str(tmp_path / "default-cache"), "dwarf")) == 1


@pytest.mark.parametrize("damage", [corrupt_truncate, corrupt_checksum, corrupt_version, corrupt_stale_header,
                                    corrupt_payload_with_valid_checksum],
                         ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_a_bad_dwarf_entry_is_read_again(dwarf_copy, cache, damage):
    elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache)
    damage(only_entry(cache, "dwarf"), "")
    assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache) == (dwarf_copy, EXPECTED)


def test_a_dwarf_entry_with_offsets_nobody_asked_for_is_a_miss(dwarf_copy, cache):
    """A checksummed entry whose answer names types or members outside the question is not used."""
    with open(dwarf_copy, "rb") as fh:
        key = elf._dwarf_key(fh, os.stat(dwarf_copy), WANTED, "")
    payload = b'{"outer_t":{"c":0,"in.b":16,"extra":4},"other_t":{"x":1}}'
    elf._write_entry(cache, elf._KIND_DWARF, key, os.stat(dwarf_copy), payload)
    assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache)[1] == EXPECTED


def test_a_changed_debug_file_is_read_again(dwarf_copy, cache):
    elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache)
    st = os.stat(dwarf_copy)
    os.utime(dwarf_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    with pytest.MonkeyPatch.context() as m:
        calls = []
        real = elf._read_member_offsets
        m.setattr(elf, "_read_member_offsets", lambda *a: calls.append(1) or real(*a))
        assert elf.dwarf_member_offsets(dwarf_copy, WANTED, cache_dir=cache)[1] == EXPECTED
    assert calls == [1]
