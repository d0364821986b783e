"""The documentation says what the code does: the settings table is generated from
config.SETTINGS, and every local link in the README and docs/ points at a file."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_settings_table_matches_the_code():
    check = subprocess.run([sys.executable, str(ROOT / "tools" / "settings_doc.py"), "--check"])
    assert check.returncode == 0, "docs/configuration.md is behind config.SETTINGS: run tools/settings_doc.py"


def test_local_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken
