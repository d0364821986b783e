"""The USDT catalog as data: loading and validating YAML files (mistakes name the file and
line), and the generic target's plan and decoding, without a kernel."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from otel_ebpf.config import Config
from otel_ebpf.targets.base import DecodeContext
from otel_ebpf.targets.usdt import RECORD, STR_MAX, UsdtCatalogTarget
from otel_ebpf.usdt_catalog import CatalogError, load_catalog, load_file, shipped_files
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
GOOD = """\
binaries:
  processes: [sdt_test_program]
  provider: otel_test
pairs:
  - name: t.query
    start: query__start
    done: query__done
    attributes:
      t.text: {probe: start, arg: 1, type: string}
      t.len: {probe: start, arg: 3, type: int, values: {8: eight}}
    metric: {name: t.duration, attributes: [t.len]}
    span: {name: "q {t.text}", kind: server, min_duration_ms: 0}
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_shipped_catalog_loads():
    catalog = load_catalog()
    names = {p.name for p in catalog.pairs}
    assert {"cpython.gc", "cpython.import", "postgresql.lock_wait", "postgresql.checkpoint",
            "otel_test.query"} <= names
    assert len(shipped_files()) >= 3


def test_a_good_file(tmp_path):
    binary_set = load_file(write(tmp_path, GOOD))
    (pair,) = binary_set.pairs
    assert pair.provider == "otel_test" and pair.key_arg == 0 and pair.metric == "t.duration"
    assert [(a.name, a.type, a.slot) for a in pair.attributes] == [("t.text", "string", 0), ("t.len", "int", 0)]
    assert pair.span and pair.span_kind == 2 and pair.metric_attributes == ("t.len",)


@pytest.mark.parametrize("edit,line,words", [
    (("    start: query__start\n", ""), 5, "`start` is required"),
    (("    key: thread\n", "") if False else ("    done: query__done\n", "    done: query__done\n    key: {arg: 0}\n"),
     5, "key must be"),
    (("type: string}", "type: text}"), 9, "type must be"),
    (("arg: 3", "arg: 42"), 10, "arg must be"),
    (("probe: start, arg: 1", "probe: middle, arg: 1"), 9, "probe must be"),
    (("attributes: [t.len]", "attributes: [t.text]"), 11, "must be an int"),
    (("attributes: [t.len]", "attributes: [t.nope]"), 11, "is not one of"),
    (("kind: server", "kind: sideways"), 12, "span kind"),
    (("    span:", "    spam:"), 5, "unknown key(s) spam"),
    (("binaries:\n", "binaries:\n  colour: red\n"), 2, "unknown key(s) colour"),
    (("    metric: {name: t.duration, attributes: [t.len]}\n    span: {name: \"q {t.text}\", kind: server, "
      "min_duration_ms: 0}\n", ""), 5, "neither a metric nor spans"),
])
def test_mistakes_name_the_file_and_line(tmp_path, edit, line, words):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(CatalogError) as exc:
        load_file(path)
    assert f"{path}:{line}" in str(exc.value) and words in str(exc.value), str(exc.value)


def test_duplicate_names_across_files(tmp_path):
    a = write(tmp_path, GOOD, "a.yaml")
    b = write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(CatalogError, match="also used at"):
        load_catalog([a, b])


@pytest.mark.parametrize("text", ["- a list\n", "binaries: []\npairs: []\n", ": :\n", "pairs:\n  - nope\n"])
def test_malformed_files(tmp_path, text):
    with pytest.raises(CatalogError):
        load_file(write(tmp_path, text))


@pytest.fixture(scope="module")
def sdt_program(tmp_path_factory) -> str:
    require(shutil.which("cc") is not None, "a C compiler (gcc) is not installed")
    out = tmp_path_factory.mktemp("sdt") / "sdt_test_program"
    subprocess.run(["cc", "-O2", "-o", str(out), str(REPO / "usdt/sdt_test_program.c"),
                    str(REPO / "usdt/sdt_test_tick.c")], check=True, capture_output=True)
    return str(out)


def test_plan_for_the_test_program(tmp_path, sdt_program):
    target = UsdtCatalogTarget()
    target.configure(Config(usdt_catalog=(write(tmp_path, GOOD.replace("t.query", "t.query2")),)))
    plan = target.plan(sdt_program, Config())
    flags = dict(f[2:].split("=", 1) for f in plan.cflags)
    assert flags["PAIRS"] == "2"  # the shipped otel_test.query and this file's pair
    labels = {a.label for a in plan.attach}
    assert labels == {"otel_test:query__start", "otel_test:query__done"}
    assert all(a.ref_ctr_offset for a in plan.attach), "the probes' semaphores are raised by the kernel"
    assert flags["P0_SS0"].startswith("((") or "ctx->" in flags["P0_SS0"]
    assert flags["P0_METRIC"] == "1" and flags["P0_SPAN"] == "1"


def test_a_probe_the_binary_lacks_is_a_start_error(tmp_path, sdt_program):
    target = UsdtCatalogTarget()
    target.configure(Config(usdt_catalog=(write(tmp_path, GOOD.replace("query__done", "query__finish")),)))
    with pytest.raises(CatalogError, match="no USDT probe otel_test:query__finish"):
        target.check(sdt_program)
    target.configure(Config(usdt_catalog=(write(tmp_path, GOOD.replace("arg: 3", "arg: 9")),)))
    with pytest.raises(CatalogError, match="has 3 argument"):
        target.check(sdt_program)


def test_decode_and_histogram_series(tmp_path):
    target = UsdtCatalogTarget()
    target.configure(Config(usdt_catalog=(write(tmp_path, GOOD),)))
    number = [p.name for p in target.pairs].index("t.query")
    text = b"SELECT 1"
    raw = RECORD.struct.pack(1_000, 3_000, 77, 78, number, 0, 8, 0, 0, 0, 0, 0, len(text), 0,
                             text.ljust(2 * STR_MAX, b"\0"))
    (span,) = target.decode([raw], DecodeContext(10**18, Config()))
    assert span.name == "q SELECT 1" and span.kind == 2 and span.end_ns - span.start_ns == 2_000
    assert span.attributes == {"thread.id": 78, "t.text": "SELECT 1", "t.len": "eight"}
    assert target.hist_series(number << 48 | 8 << 24) == ("t.duration", {"t.len": "eight"})
    assert target.decode([raw[:10]], DecodeContext(0, Config())) == [] and target.malformed_records == 1
