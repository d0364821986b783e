"""Resources: one per watched process, and the agent's own.

A watched process's Resource is, from weakest to strongest: what /proc tells
(executable, pid, container id) and the host's identity; the agent's
OTEL_RESOURCE_ATTRIBUTES (e.g. deployment.environment.name, or host.name from the
Kubernetes downward API), without its `service.*` keys, which name the agent; the
process's own OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME from its environment.
"""
from __future__ import annotations

import collections
import os
import threading
import time
import urllib.parse
from typing import Mapping

from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.semconv._incubating.attributes import (
    container_attributes as CONTAINER,
    host_attributes as HOST,
    process_attributes as PROCESS,
)
from opentelemetry.semconv.attributes import service_attributes as SERVICE
from opentelemetry.semconv.attributes import telemetry_attributes as TELEMETRY

from . import __version__, identity, process
from .protobuf import to_key_values


def process_resource_attributes(raw: str | None) -> dict[str, str]:
    """A process's own OTEL_RESOURCE_ATTRIBUTES; malformed items are skipped (it is the
    watched program's setting: never a reason to fail)."""
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = urllib.parse.unquote(value.strip())
    return out


def host_attributes(configured: Mapping[str, str]) -> dict[str, object]:
    attrs: dict[str, object] = {HOST.HOST_NAME: identity.host_name()}
    hid = identity.host_id()
    if hid:
        attrs[HOST.HOST_ID] = hid
    return attrs


def agent_resource(agent_service_name: str, configured: Mapping[str, str], health_addr: str) -> dict[str, object]:
    """The agent's own Resource (its metrics and logs about itself)."""
    attrs = host_attributes(configured)
    attrs.update({
        SERVICE.SERVICE_NAME: agent_service_name,
        SERVICE.SERVICE_VERSION: __version__,
        SERVICE.SERVICE_INSTANCE_ID: identity.instance_id(str(attrs.get(HOST.HOST_ID) or attrs[HOST.HOST_NAME]),
                                                                   health_addr),
        PROCESS.PROCESS_PID: os.getpid(),
        TELEMETRY.TELEMETRY_SDK_NAME: "otel-ebpf",
        TELEMETRY.TELEMETRY_SDK_LANGUAGE: "python",
        TELEMETRY.TELEMETRY_SDK_VERSION: __version__,
    })
    attrs.update(configured)
    return attrs


class ResourceCache:
    """Resource attributes of each watched process, read once per process identity."""

    MAX_PROCESSES = 1024  # least recently used first out: short-lived clients come and go
    # A cached pid is checked against /proc (its start time: a reused pid is another
    # process) at most this often: every drain asks for the pids it saw.
    RECHECK_S = 5.0  # how often a pid with spans is checked for reuse by a new process

    def __init__(self, configured: Mapping[str, str] | None = None, service_name_override: str | None = None):
        self._by_pid: collections.OrderedDict[int, tuple[int, dict[str, object], Resource]] = \
            collections.OrderedDict()
        self._override = service_name_override
        # The agent's OTEL_RESOURCE_ATTRIBUTES, minus the keys that name the agent itself.
        self._shared = {k: v for k, v in (configured or {}).items() if not k.startswith("service.")}
        self._host = host_attributes(configured or {})
        self._lock = threading.Lock()
        self._checked_at: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._by_pid)

    def attributes(self, pid: int) -> dict[str, object]:
        return self._entry(pid)[1]

    def proto(self, pid: int) -> Resource:
        return self._entry(pid)[2]

    def _entry(self, pid: int) -> tuple[int, dict[str, object], Resource]:
        now = time.monotonic()
        with self._lock:
            cached = self._by_pid.get(pid)
            if cached is not None and now - self._checked_at.get(pid, 0.0) < self.RECHECK_S:
                return cached
        fields = process.stat_fields(pid)
        start = fields[2] if fields else -1
        with self._lock:
            cached = self._by_pid.get(pid)
            # A process that exited keeps its cached Resource (its spans may still be queued).
            if cached is not None and (start == -1 or cached[0] == start):
                self._by_pid.move_to_end(pid)
                self._checked_at[pid] = now
                return cached
        attrs = self._read(pid, fields)
        entry = (start, attrs, Resource(attributes=to_key_values(attrs)))
        with self._lock:
            self._by_pid[pid] = entry
            self._by_pid.move_to_end(pid)
            self._checked_at[pid] = now
            while len(self._by_pid) > self.MAX_PROCESSES:
                self._checked_at.pop(self._by_pid.popitem(last=False)[0], None)
        return entry

    def forget_exited(self, idle_s: float = 60.0) -> int:
        """Drop the Resources of processes that exited and were not asked for in `idle_s`
        (their spans are long exported): short-lived clients would otherwise keep up to
        MAX_PROCESSES entries. Returns how many were dropped."""
        now = time.monotonic()
        with self._lock:
            idle = [pid for pid in self._by_pid if now - self._checked_at.get(pid, 0.0) > idle_s]
        gone = [pid for pid in idle if not os.path.exists(f"/proc/{pid}")]
        with self._lock:
            for pid in gone:
                self._by_pid.pop(pid, None)
                self._checked_at.pop(pid, None)
        return len(gone)

    def _read(self, pid: int, fields: tuple[str, int, int] | None) -> dict[str, object]:
        info = process.proc_info(pid)
        exe_name = os.path.basename(info.exe) if info and info.exe else (fields[0] if fields else "unknown")
        environ = process.environ_values(pid, ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"))
        attrs: dict[str, object] = dict(self._host)
        attrs.update({
            SERVICE.SERVICE_NAME: exe_name,
            PROCESS.PROCESS_PID: pid,
            PROCESS.PROCESS_EXECUTABLE_NAME: exe_name,
        })
        if info and info.exe:
            attrs[PROCESS.PROCESS_EXECUTABLE_PATH] = info.exe
        cid = process.container_id(pid)
        if cid:
            attrs[CONTAINER.CONTAINER_ID] = cid
        attrs.update(self._shared)
        attrs.update(process_resource_attributes(environ.get("OTEL_RESOURCE_ATTRIBUTES")))
        service = self._override or environ.get("OTEL_SERVICE_NAME")
        if service:
            attrs[SERVICE.SERVICE_NAME] = service
        return attrs
