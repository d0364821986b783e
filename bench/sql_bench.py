"""SQL sanitizing per span: microseconds per analyze() call, the old sql.py against the new.

    .venv/bin/python bench/sql_bench.py              # 7 rounds, a few seconds
    .venv/bin/python bench/sql_bench.py --rounds 15

The old implementation is bench/sql_reference_2026_11.py, a frozen copy of
otel_ebpf/sql.py as it was before the single-tokenizer rewrite. Modes:

* **cached**: the same input again (what a repeated query costs);
* **new literals**: the same query with fresh literal values each call (pgbench
  -M simple, ORMs that inline values): the new code misses its exact-input cache
  and hits its shape cache; the old code hit its literal-free cache only when its
  regexes allowed it;
* **uncached**: nothing cached (a query never seen, not even its shape): the old
  `_analyze`, the new one with the shape cache bypassed.

Every case runs old and new alternately, in an order rotated each round, each a
batch of calls timed one by one; the table shows the median of the rounds'
medians and new/old. The last column is pglast.parser.scan() alone (PostgreSQL's
own lexer, C), for docs/sql-redaction.md. Not run by bench/run.py.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import sql_reference_2026_11 as old  # noqa: E402

from otel_ebpf import sql as new  # noqa: E402

try:
    from pglast import parser as pglast_parser
except ImportError:  # pragma: no cover - pglast is a test dependency
    pglast_parser = None

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# (name, dialect, template): {n} and {m} take fresh numbers, {s} a fresh string.
INPUTS = [
    ("orm select", "postgresql",
     "SELECT users.id AS users_id, users.name AS users_name, users.email AS users_email, "
     "users.created_at AS users_created_at FROM users WHERE users.email = '{s}@example.com' "
     "AND users.active = true LIMIT {n}"),
    ("django", "postgresql",
     'SELECT "polls_question"."id", "polls_question"."question_text", "polls_question"."pub_date" '
     'FROM "polls_question" WHERE "polls_question"."id" = {n} LIMIT 21'),
    ("pgbench select", "postgresql", "SELECT abalance FROM pgbench_accounts WHERE aid = {n};"),
    ("pgbench update", "postgresql",
     "UPDATE pgbench_accounts SET abalance = abalance + {m} WHERE aid = {n};"),
    ("pgbench insert", "postgresql",
     "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({n}, 7, {m}, -{n}, CURRENT_TIMESTAMP);"),
    ("insert 20 rows", "postgresql",
     "INSERT INTO events (id, kind, payload, at) VALUES "
     + ", ".join(f"({{n}}{i}, 'kind{i}', '{{s}}', {{m}}.5)" for i in range(20))),
    ("sqlcommenter", "postgresql",
     "SELECT * FROM polls_question WHERE id = {n} "
     "/*controller='index',db_driver='psycopg2',framework='django%3A4.2',route='%2Fpolls%2F',"
     f"traceparent='{TRACEPARENT[:-4]}{{n}}-01'*/"),
    ("mysql orm", "mysql",
     "SELECT `orders`.`id`, `orders`.`total`, `customers`.`name` FROM `orders` INNER JOIN `customers` "
     "ON `customers`.`id` = `orders`.`customer_id` WHERE `orders`.`status` = '{s}' AND `orders`.`id` > {n}"),
]
MODES = ("cached", "new literals", "uncached")


def _variants(template: str, count: int) -> list[str]:
    return [template.replace("{n}", str(100_000 + i)).replace("{m}", str(7 * i + 3))
            .replace("{s}", f"user{i:06d}") for i in range(count)]


def _time_calls(fn: Callable[[bytes], object], inputs: list[bytes]) -> float:
    """Median microseconds of fn over inputs, each call timed on its own."""
    times = []
    clock = time.perf_counter_ns
    for q in inputs:
        start = clock()
        fn(q)
        times.append(clock() - start)
    return statistics.median(times) / 1000


def _runners(dialect: str) -> dict[tuple[str, str], Callable[[bytes], object]]:
    def new_uncached(q: bytes) -> object:
        return new._analyze(q, dialect, 4096)

    return {
        ("old", "cached"): lambda q: old.analyze(q, dialect),
        ("new", "cached"): lambda q: new.analyze(q, dialect),
        ("old", "new literals"): lambda q: old.analyze(q, dialect),
        ("new", "new literals"): lambda q: new.analyze(q, dialect),
        ("old", "uncached"): lambda q: old._analyze(q, dialect, 4096),
        ("new", "uncached"): new_uncached,
    }


def measure(rounds: int, batch: int) -> dict[tuple[str, str, str], list[float]]:
    results: dict[tuple[str, str, str], list[float]] = {}
    fresh = itertools.count()
    for r in range(rounds):
        for name, dialect, template in INPUTS:
            runners = _runners(dialect)
            cached = [template.replace("{n}", "42").replace("{m}", "7").replace("{s}", "alice").encode()] * batch
            for mode in MODES[r % 3:] + MODES[:r % 3]:
                for impl in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    if mode == "cached":
                        inputs = cached
                        runners[(impl, mode)](inputs[0])  # warm
                    else:  # never seen before by either cache
                        base = next(fresh) * batch
                        inputs = [v.encode() for v in _variants(template.replace("{n}", f"{base}{{n}}"), batch)]
                    fn = runners[(impl, mode)]
                    if impl == "new" and mode == "uncached":
                        real, new._analyze_cached = new._analyze_cached, new._finish  # shape cache off
                        try:
                            t = _time_calls(fn, inputs)
                        finally:
                            new._analyze_cached = real
                    else:
                        t = _time_calls(fn, inputs)
                    results.setdefault((name, mode, impl), []).append(t)
            if pglast_parser is not None and dialect == "postgresql":
                texts = [template.replace("{n}", "42").replace("{m}", "7").replace("{s}", "alice")] * batch
                results.setdefault((name, "pglast", "scan"), []).append(_time_calls(pglast_parser.scan, texts))
    return results


def render(results: dict[tuple[str, str, str], list[float]]) -> str:
    lines = [
        "| input | bytes | mode | old µs | new µs | new/old | pglast scan µs |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, dialect, template in INPUTS:
        size = len(template.replace("{n}", "42").replace("{m}", "7").replace("{s}", "alice").encode())
        scan = results.get((name, "pglast", "scan"))
        for mode in MODES:
            o = statistics.median(results[(name, mode, "old")])
            n = statistics.median(results[(name, mode, "new")])
            s = f"{statistics.median(scan):.1f}" if scan and mode == "uncached" else ""
            lines.append(f"| {name} ({dialect}) | {size} | {mode} | {o:.1f} | {n:.1f} | {n / o:.2f} | {s} |")
    return "\n".join(lines)


def targets(results: dict[tuple[str, str, str], list[float]]) -> str:
    cached = max(statistics.median(results[(name, "cached", "new")]) for name, _, _ in INPUTS)
    orm = statistics.median(results[("orm select", "uncached", "new")])
    out = [f"- cached call, worst input: {cached:.2f} µs (target ≤ 3): {'PASS' if cached <= 3 else 'MISS'}",
           f"- uncached 200-byte ORM select: {orm:.1f} µs (target ≤ 25): {'PASS' if orm <= 25 else 'MISS'}"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    start = time.perf_counter()
    results = measure(args.rounds, args.batch)
    print(f"# sql.analyze(), {time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} rounds of {args.batch} calls, "
          f"Python {sys.version.split()[0]}\n")
    print(render(results))
    print()
    print(targets(results))
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
