"""Known targets by name. A new target is one module here and one C file in probes/."""
from __future__ import annotations

import importlib

from .base import Target

# name in --targets -> "module:Class"
TARGETS: dict[str, str] = {
    "postgres": "otel_ebpf.targets.postgres:PostgresTarget",
    "mysql": "otel_ebpf.targets.mysql:MysqlTarget",
    "nginx": "otel_ebpf.targets.nginx:NginxTarget",
    "openssl": "otel_ebpf.targets.openssl:OpensslTarget",
}

_instances: dict[str, Target] = {}


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


def create(name: str) -> Target:
    module, cls = TARGETS[name].split(":")
    instance = getattr(importlib.import_module(module), cls)()
    _instances[name] = instance
    return instance


def get(name: str) -> Target:
    return _instances.get(name) or create(name)
