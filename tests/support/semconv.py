"""Hold exported attributes against the semantic conventions registry (shared/schemas)."""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from .prereq import IN_CI

REGISTRY_PATH = Path(__file__).resolve().parents[3] / "shared/schemas/semconv-registry.json"
PY_TYPES = {"string": str, "int": int, "boolean": bool, "double": float}


@cache
def registry() -> dict | None:
    if not REGISTRY_PATH.exists():
        if IN_CI:
            pytest.fail(f"{REGISTRY_PATH} is missing: CI places shared/ beside the clone", pytrace=False)
        return None
    return json.loads(REGISTRY_PATH.read_text())["attributes"]


def assert_registered(spans) -> None:
    """Every span and resource attribute is registered, with the registered type
    (an int attribute goes out as an int); keys of our own use the otel_ebpf. prefix."""
    registered = registry()
    if registered is None:
        return
    for s in spans:
        for key, value in {**s.attributes, **s.resource}.items():
            if key.startswith("otel_ebpf."):
                continue
            assert key in registered, f"{key} is not a registered attribute"
            py = PY_TYPES.get(registered[key]["type"])
            if py:
                assert isinstance(value, py), f"{key}={value!r} should be {registered[key]['type']}"
