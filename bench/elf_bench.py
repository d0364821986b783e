"""ELF reading at agent start, per binary: milliseconds for one ElfInfo.

    .venv/bin/python bench/elf_bench.py              # 5 rounds, ~10 s
    .venv/bin/python bench/elf_bench.py --rounds 9

Columns: **old cold** = ElfInfo read as before the bulk symbol tables (pyelftools'
per-symbol iteration, segments from its iter_segments()); **new cold** = the
bulk reading, no cache; **cold + store** = the same and writing the cache entry (an
agent's first start); **warm** = a cache hit (what every later start pays). Rounds are
interleaved (each round runs every case of every binary, in a rotated order) and the
median counts. "Cold" means no otel-ebpf cache: the binaries are in the page cache after
the first round in every column, as they are for an agent started next to running servers.
Not run by bench/run.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otel_ebpf import elf  # noqa: E402

BINARIES = {
    "mariadbd": "/usr/sbin/mariadbd",
    "postgres": "/usr/lib/postgresql/15/bin/postgres",
    "nginx": "/usr/sbin/nginx",
    "libssl": "/usr/lib/x86_64-linux-gnu/libssl.so.3",
}
CASES = ("old cold", "new cold", "cold + store", "warm")


def old_cold(path: str, _scratch: str) -> elf.ElfInfo:
    # the reading as it was: pyelftools' per-symbol iteration, PT_LOADs from iter_segments()
    real = elf._read_symbols, elf._program_headers
    elf._read_symbols, elf._program_headers = elf._read_symbols_pyelftools, lambda fh: None
    try:
        return elf.ElfInfo(path)
    finally:
        elf._read_symbols, elf._program_headers = real


def new_cold(path: str, _scratch: str) -> elf.ElfInfo:
    return elf.ElfInfo.load(path, cache_dir=None)


def cold_and_store(path: str, scratch: str) -> elf.ElfInfo:
    return elf.ElfInfo.load(path, cache_dir=tempfile.mkdtemp(dir=scratch))  # an empty cache each time


def warm(path: str, scratch: str) -> elf.ElfInfo:
    info = elf.ElfInfo.load(path, cache_dir=os.path.join(scratch, "warm"))
    assert info.from_cache, "warm case missed the cache"
    return info


RUNNERS: dict[str, Callable[[str, str], elf.ElfInfo]] = dict(zip(CASES, (old_cold, new_cold, cold_and_store, warm)))


def measure(rounds: int, binaries: dict[str, str], scratch: str) -> dict[tuple[str, str], list[float]]:
    for path in binaries.values():  # fill the warm cache once
        elf.ElfInfo.load(path, cache_dir=os.path.join(scratch, "warm"))
    times: dict[tuple[str, str], list[float]] = {(b, c): [] for b in binaries for c in CASES}
    for r in range(rounds):
        order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
        for name, path in binaries.items():
            for case in order:
                start = time.perf_counter()
                info = RUNNERS[case](path, scratch)
                times[(name, case)].append((time.perf_counter() - start) * 1e3)
                del info  # freeing 30k symbols is not part of reading them: outside the timing
    return times


def render(times: dict[tuple[str, str], list[float]], binaries: dict[str, str]) -> str:
    headers = ["binary", "symbols", *(f"{c} ms" for c in CASES), "old/new", "old/warm"]
    rows = []
    totals = dict.fromkeys(CASES, 0.0)
    for name, path in binaries.items():
        med = {c: statistics.median(times[(name, c)]) for c in CASES}
        for c in CASES:
            totals[c] += med[c]
        symbols = len(elf.ElfInfo.load(path, cache_dir=None)._symbols)
        rows.append([name, f"{symbols:,}", *(f"{med[c]:.1f}" for c in CASES),
                     f"{med['old cold'] / med['new cold']:.0f}x", f"{med['old cold'] / med['warm']:.0f}x"])
    rows.append(["all", "", *(f"{totals[c]:.1f}" for c in CASES),
                 f"{totals['old cold'] / totals['new cold']:.0f}x", f"{totals['old cold'] / totals['warm']:.0f}x"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    present = {n: p for n, p in BINARIES.items() if os.path.exists(p)}
    for name in BINARIES.keys() - present.keys():
        print(f"{name}: {BINARIES[name]} not installed, left out", file=sys.stderr)
    if not present:
        return 1
    with tempfile.TemporaryDirectory(prefix="elf-bench-") as scratch:
        times = measure(args.rounds, present, scratch)
    print(f"### ELF reading per binary, median of {args.rounds} interleaved rounds (ms)\n")
    print(render(times, present))
    return 0


if __name__ == "__main__":
    sys.exit(main())
