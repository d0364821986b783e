"""host.name and host.id from inside a container with `pid: host`: read through /proc/1/root
when the agent's own namespaces are not the host's (a fake /proc stands in for both)."""
from __future__ import annotations

import os
import socket

from otel_ebpf import identity

HOST_ID = "0123456789abcdef0123456789abcdef"
CONTAINER_ID = "fedcba9876543210fedcba9876543210"


def fake_proc(tmp_path, same_namespaces: bool):
    proc = tmp_path / "proc"
    host_root = tmp_path / "host"
    (host_root / "etc").mkdir(parents=True)
    (host_root / "etc/hostname").write_text("node-7.example\n")
    (host_root / "etc/machine-id").write_text(HOST_ID + "\n")
    for pid, ns in (("1", "host"), ("self", "host" if same_namespaces else "container")):
        (proc / pid / "ns").mkdir(parents=True)
        for kind in ("uts", "mnt"):
            os.symlink(f"{kind}:[{ns}]", proc / pid / "ns" / kind)
    os.symlink(host_root, proc / "1" / "root")
    return str(proc)


def uncached(fn, *args):
    return fn.__wrapped__(*args)


def test_in_a_container_the_host_name_and_id_are_the_hosts(tmp_path):
    proc = fake_proc(tmp_path, same_namespaces=False)
    assert uncached(identity.host_name, proc) == "node-7.example"
    assert uncached(identity.host_id, proc) == HOST_ID


def test_on_the_host_its_own_view_is_used(tmp_path):
    proc = fake_proc(tmp_path, same_namespaces=True)
    assert uncached(identity.host_name, proc) == socket.gethostname()
    ours = identity._read("/etc/machine-id")
    # our own /etc/machine-id comes first; a machine without one falls back to /proc/1/root
    assert uncached(identity.host_id, proc) == (ours if len(ours) == 32 else HOST_ID)


def test_an_unreadable_host_root_falls_back_to_our_own_view(tmp_path):
    proc = fake_proc(tmp_path, same_namespaces=False)
    os.unlink(os.path.join(proc, "1", "root"))
    assert uncached(identity.host_name, proc) == socket.gethostname()


def test_the_instance_id_is_stable_and_differs_per_listen_address():
    a = identity.instance_id("node-7", "0.0.0.0:9464")
    assert a == identity.instance_id("node-7", "0.0.0.0:9464")
    assert a != identity.instance_id("node-7", "0.0.0.0:9465") != identity.instance_id("node-8", "0.0.0.0:9464")
