"""The wheel carries the BPF C files and the USDT catalog: an install outside the repo works."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def source_tree(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (a stale build/ would leak into the wheel)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_wheel_ships_probes_and_catalog(tmp_path):
    src = source_tree(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("otel_ebpf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for c_file in (REPO / "probes").glob("*.[ch]"):
        assert f"otel_ebpf/probes/{c_file.name}" in names
    for data in (REPO / "usdt").glob("*.yaml"):
        assert f"otel_ebpf/usdt/{data.name}" in names
    for data in (REPO / "usdt" / "catalog").glob("*.yaml"):
        assert f"otel_ebpf/usdt/catalog/{data.name}" in names
    assert "otel_ebpf/usdt/mysql_usdt_test.c" in names
    for module in ("cli", "agent", "bpf", "compiler", "loader", "elf", "targets/postgres", "targets/usdt",
                   "servers/postgres", "demo"):
        assert f"otel_ebpf/{module}.py" in names
    assert not [n for n in names if n.startswith("otel_ebpf/") and n.endswith(".py")
                and not (REPO / n.replace("otel_ebpf/probes/", "probes/").replace("otel_ebpf/usdt/", "usdt/")).exists()
                and not (REPO / n).exists()], "every module in the wheel is in the source tree"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "otel-ebpf = otel_ebpf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
