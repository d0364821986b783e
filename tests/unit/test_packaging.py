"""The wheel carries the BPF C files and the USDT catalog: an install outside the repo works."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_probes_and_catalog(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("otel_ebpf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for c_file in (REPO / "probes").glob("*.[ch]"):
        assert f"otel_ebpf/probes/{c_file.name}" in names
    for data in (REPO / "usdt").glob("*.yaml"):
        assert f"otel_ebpf/usdt/{data.name}" in names
    assert "otel_ebpf/usdt/mysql_usdt_test.c" in names
    for module in ("cli", "bpf", "elf", "pipeline", "targets/postgres", "servers/postgres", "demo"):
        assert f"otel_ebpf/{module}.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "otel-ebpf = otel_ebpf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
