"""Rewrite the settings table in docs/configuration.md from otel_ebpf.config.SETTINGS.

    .venv/bin/python tools/settings_doc.py          # rewrite
    .venv/bin/python tools/settings_doc.py --check  # exit 1 when the doc is behind the code
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from otel_ebpf.config import settings_markdown  # noqa: E402

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN, END = "<!-- settings:begin (tools/settings_doc.py) -->\n", "<!-- settings:end -->\n"


def rendered(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + BEGIN + settings_markdown() + END + tail


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    new = rendered(text)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
