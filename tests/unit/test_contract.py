"""The kernel/user contract, held by the host compiler: every record layout a Python decoder
uses against its C header (offset and size of each field), and the shared constants that
reach probes/common.h as -D cflags (duration buckets, SQL keywords, stats indexes)."""
from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest

from otel_ebpf import contract
from otel_ebpf.targets import registry
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
PROBES = REPO / "probes"

# Just enough of bcc's C dialect for gcc: maps become structs of function pointers, so that
# `stats.lookup(&k)` compiles; helpers become declarations nobody calls here.
BCC_STUBS = r"""
#include <stddef.h>
#include <stdint.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
typedef int8_t s8; typedef int16_t s16; typedef int32_t s32; typedef int64_t s64;
#define __always_inline inline
struct pt_regs { u64 regs[32]; };
#define BPF_MAP_STUB(name, key, value) struct { value *(*lookup)(void *); value *(*lookup_or_try_init)(void *, value *); \
    int (*update)(void *, value *); int (*delete)(void *); int (*ringbuf_output)(void *, u32, u64); } name
#define BPF_RINGBUF_OUTPUT(name, pages) BPF_MAP_STUB(name, int, char)
#define BPF_PERCPU_ARRAY(name, value, n) BPF_MAP_STUB(name, int, value)
#define BPF_ARRAY(name, value, n) BPF_MAP_STUB(name, int, value)
#define BPF_HASH(name, key, value, n) BPF_MAP_STUB(name, key, value)
#define BPF_TABLE(kind, key, value, name, n) BPF_MAP_STUB(name, key, value)
static u32 bpf_get_prandom_u32(void) { return 0; }
static u64 bpf_ktime_get_ns(void) { return 0; }
"""


def _gcc() -> str:
    gcc = shutil.which("gcc")
    require(gcc is not None, "gcc is not installed (build-essential)")
    return gcc  # type: ignore[return-value]


def _run_c(tmp_path: Path, source: str, defines: list[str] = ()) -> str:
    (tmp_path / "uapi" / "linux").mkdir(parents=True, exist_ok=True)
    (tmp_path / "uapi" / "linux" / "ptrace.h").write_text("/* stub */\n")
    c = tmp_path / "check.c"
    c.write_text(BCC_STUBS + source)
    exe = tmp_path / "check"
    result = subprocess.run([_gcc(), "-std=gnu11", "-w", f"-I{tmp_path}", f"-I{PROBES}", *defines, "-o", str(exe),
                             str(c)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout


def _all_layouts() -> list[contract.RecordLayout]:
    for name in registry.TARGETS:
        importlib.import_module(registry.TARGETS[name].split(":")[0])
    return list(contract.LAYOUTS)


@pytest.mark.parametrize("layout", _all_layouts(), ids=lambda lay: f"{lay.header}:{lay.c_struct}")
def test_record_layout_matches_the_header(tmp_path, layout):
    prints = "".join(
        f'printf("{name} %zu %zu\\n", offsetof(struct {layout.c_struct}, {name}), '
        f'sizeof(((struct {layout.c_struct} *)0)->{name}));\n' for name, _ in layout.fields)
    if layout.tail:
        prints += f'printf("{layout.tail} %zu 0\\n", offsetof(struct {layout.c_struct}, {layout.tail}));\n'
    out = _run_c(tmp_path, f'#include <stdio.h>\n#include "{layout.header}"\nint main(void) {{\n{prints}return 0;\n}}\n')
    seen = {name: (int(off), int(size)) for name, off, size in (line.split() for line in out.splitlines())}
    expected = layout.offsets()
    for name, (offset, size) in expected.items():
        assert seen[name] == (offset, size), f"{layout.c_struct}.{name}: C {seen[name]}, Python {(offset, size)}"
    if layout.tail:
        assert seen[layout.tail][0] == layout.size, f"{layout.c_struct}.{layout.tail} must follow the head"


def test_every_record_header_is_declared_by_a_decoder():
    declared = {lay.header for lay in _all_layouts()}
    headers = {p.name for p in PROBES.glob("*.h")} - {"common.h"}
    assert headers == declared, "each probes/<name>.h record has a RecordLayout in its target"


def test_prelude_constants_come_from_python(tmp_path):
    bounds_ns = [round(b * 1e9) for b in contract.DURATION_BUCKETS]
    probes = [0, *bounds_ns, *(b + 1 for b in bounds_ns), 10**12]
    words = [w for w in contract.SQL_OPERATIONS[1:]] + ["start", " end", "((abort", "SELECTED", "with x", "nothing"]
    cases = "".join(f'printf("b %llu %u\\n", {n}ULL, duration_bucket({n}ULL));\n' for n in probes)
    cases += "".join('{ char q[24] = {0}; memcpy(q, "%s", %d); printf("k %%s|%%u\\n", "%s", sql_operation(q)); }\n'
                     % (w, len(w), w) for w in words)
    cases += "".join(f'printf("s {s.name} %d\\n", STAT_{s.name});\n' for s in contract.Stat)
    out = _run_c(tmp_path, '#include <stdio.h>\n#include <string.h>\n#include "common.h"\n'
                           f"int main(void) {{\n{cases}return 0;\n}}\n", contract.prelude_cflags())
    buckets = {int(n): int(b) for kind, n, b in (line.split(" ") for line in out.splitlines() if line[0] == "b")}
    for n, bucket in buckets.items():
        expected = next((i for i, b in enumerate(bounds_ns) if n <= b), len(bounds_ns))
        assert bucket == expected, f"{n} ns: kernel bucket {bucket}, Python {expected}"
    keywords = dict(line[2:].split("|") for line in out.splitlines() if line[0] == "k")
    for word in contract.SQL_OPERATIONS[1:]:
        assert contract.sql_operation_name(int(keywords[word])) == word
    assert contract.sql_operation_name(int(keywords["start"])) == "BEGIN"
    assert contract.sql_operation_name(int(keywords[" end"])) == "COMMIT"
    assert contract.sql_operation_name(int(keywords["((abort"])) == "ROLLBACK"
    assert keywords["SELECTED"] == "0" and keywords["nothing"] == "0"
    assert contract.sql_operation_name(int(keywords["with x"])) == "WITH"
    stats = {name: int(v) for kind, name, v in (line.split(" ") for line in out.splitlines() if line[0] == "s")}
    assert stats == {s.name: s.value for s in contract.Stat}


def test_no_keyword_is_longer_than_the_kernel_compares():
    assert all(len(w) <= 8 for w in contract.SQL_OPERATIONS)
