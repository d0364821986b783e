"""Who is who: the host the agent watches and the agent's own instance id.

In a container with `pid: host`, /proc/1 is the host's init: the host's hostname and
machine id are read through /proc/1/root when the agent's own UTS namespace is not the
host's. OTEL_RESOURCE_ATTRIBUTES (host.name from the Kubernetes downward API, say)
still wins over what is detected here (resources.py merges it last).
"""
from __future__ import annotations

import functools
import os
import socket
import uuid

PROC = "/proc"
# uuid5 namespace of the agent's service.instance.id (any fixed UUID; this one is ours).
_INSTANCE_NAMESPACE = uuid.UUID("4d3c6c0e-6a46-4b38-9a7f-2b0f4f1a6e11")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _same_namespace(kind: str, proc: str = PROC) -> bool:
    try:
        return os.readlink(f"{proc}/1/ns/{kind}") == os.readlink(f"{proc}/self/ns/{kind}")
    except OSError:
        return True  # cannot tell (no /proc/1 access): take our own view


@functools.lru_cache(maxsize=1)
def host_name(proc: str = PROC) -> str:
    """The host's name: ours, unless we run in our own UTS namespace (a container) and the
    host's /etc/hostname is readable through /proc/1/root."""
    if not _same_namespace("uts", proc):
        name = _read(f"{proc}/1/root/etc/hostname").split("\n", 1)[0].strip()
        if name:
            return name
    return socket.gethostname()


@functools.lru_cache(maxsize=1)
def host_id(proc: str = PROC) -> str:
    """The host's machine id (semantic conventions' host.id for non-cloud hosts): the host's
    /etc/machine-id, through /proc/1/root when we run in a container; "" if unknown."""
    roots = [f"{proc}/1/root", ""] if not _same_namespace("mnt", proc) else ["", f"{proc}/1/root"]
    for root in roots:
        for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            value = _read(root + path)
            if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
                return value
    return _read("/sys/class/dmi/id/product_uuid").lower()


def instance_id(host: str, health_addr: str) -> str:
    """The agent's service.instance.id: stable across restarts on one host (derived from the
    host id and where the agent listens, so that two agents on one host differ)."""
    return str(uuid.uuid5(_INSTANCE_NAMESPACE, f"{host}/{health_addr}"))
