"""The one table of targets: name -> "module:Class". Config, the CLI, doctor and the agent
read the names from here; a new target is one line here, one module beside this one and
one C file in probes/ (or, for a USDT start/done pair, one YAML file in usdt/ and no
code: the `usdt` target runs the catalog).

This module imports no target: the config can name targets without loading them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Target

TARGETS: dict[str, str] = {
    "postgres": "otel_ebpf.targets.postgres:PostgresTarget",
    "mysql": "otel_ebpf.targets.mysql:MysqlTarget",
    "nginx": "otel_ebpf.targets.nginx:NginxTarget",
    "openssl": "otel_ebpf.targets.openssl:OpensslTarget",
    "usdt": "otel_ebpf.targets.usdt:UsdtCatalogTarget",
}
TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)

_instances: dict[str, "Target"] = {}


def available() -> list[str]:
    """Targets whose module exists in this build."""
    out = []
    for name, spec in TARGETS.items():
        try:
            importlib.import_module(spec.split(":")[0])
        except ModuleNotFoundError:
            continue
        out.append(name)
    return out


def create(name: str) -> "Target":
    module, cls = TARGETS[name].split(":")
    instance = getattr(importlib.import_module(module), cls)()
    _instances[name] = instance
    return instance


def get(name: str) -> "Target":
    return _instances.get(name) or create(name)
