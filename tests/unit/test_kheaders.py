"""Which kernel headers bcc gets (otel_ebpf.kheaders), on fake file systems: no root needed.

Also doctor's use of it (fatal only when nothing is found) and its per-architecture bpf(2)
syscall number.
"""
from __future__ import annotations

import posixpath

import pytest

from otel_ebpf import doctor, kheaders
from otel_ebpf.kheaders import compile_environment, find_kernel_headers

R = "6.18.44-custom"  # the running kernel in these tests


class FakeFS:
    """Files, directories and symlinks, with the os.path functions find_kernel_headers takes."""

    def __init__(self):
        self.files: dict[str, str] = {}
        self.dirs: set[str] = {"/"}
        self.links: dict[str, str] = {}

    def _mkdirs(self, path: str) -> None:
        while path not in ("/", ""):
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def file(self, path: str, text: str = "") -> FakeFS:
        self.files[path] = text
        self._mkdirs(posixpath.dirname(path))
        return self

    def link(self, path: str, target: str) -> FakeFS:
        self.links[path] = target
        self._mkdirs(posixpath.dirname(path))
        return self

    def tree(self, root: str, release: str | None = None, arch: str = "x86", split: str | None = None) -> FakeFS:
        """A header tree: self-contained, or the generated half of a split one (split='build')
        or its source half (split='source')."""
        if split != "build":
            self.file(f"{root}/include/linux/kconfig.h", "/* kconfig */")
            self._mkdirs(f"{root}/arch/{arch}/include/asm")
        if split != "source":
            self._mkdirs(f"{root}/include/generated")
            self._mkdirs(f"{root}/arch/{arch}/include/generated")
            if release:
                self.file(f"{root}/include/generated/utsrelease.h", f'#define UTS_RELEASE "{release}"\n')
        return self

    def resolve(self, path: str, depth: int = 0) -> str:
        if depth > 20:
            return path
        parts = path.strip("/").split("/")
        cur = "/"
        for i, part in enumerate(parts):
            cur = posixpath.join(cur, part)
            if cur in self.links:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(cur), self.links[cur]))
                return self.resolve(posixpath.join(target, *parts[i + 1:]), depth + 1)
        return posixpath.normpath(cur)

    def exists(self, path: str) -> bool:
        real = self.resolve(path)
        return real in self.files or real in self.dirs

    def isdir(self, path: str) -> bool:
        return self.resolve(path) in self.dirs

    def listdir(self, path: str) -> list[str]:
        real = self.resolve(path)
        if real not in self.dirs:
            raise FileNotFoundError(path)
        names = {p[len(real.rstrip("/")) + 1:].split("/")[0]
                 for p in [*self.files, *self.dirs, *self.links] if p.startswith(real.rstrip("/") + "/")}
        return sorted(n for n in names if n)

    def realpath(self, path: str) -> str:
        return self.resolve(path)

    def read_text(self, path: str) -> str:
        real = self.resolve(path)
        if real not in self.files:
            raise FileNotFoundError(path)
        return self.files[real]

    def find(self, env=None, release=R, machine="x86_64", in_container=False, **kw):
        return find_kernel_headers(release, env or {}, self.exists, isdir=self.isdir, listdir=self.listdir,
                                   realpath=self.realpath, read_text=self.read_text, machine=machine,
                                   in_container=in_container, **kw)


BUNDLED = kheaders.BUNDLED_HEADERS


# ---------------------------------------------------------------- each kind


def test_matching_headers_self_contained():
    fs = FakeFS().tree(f"/usr/src/kernels/{R}", R).link(f"/lib/modules/{R}/build", f"/usr/src/kernels/{R}")
    src = fs.find()
    assert (src.kind, src.path, src.ok) == ("matching", f"/lib/modules/{R}/build", True)
    assert "running kernel" in src.detail and f"/usr/src/kernels/{R}" in src.detail
    assert compile_environment(src) == {}  # bcc finds /lib/modules/R/build itself


def test_matching_headers_split_like_debian():
    fs = (FakeFS().tree(f"/usr/src/linux-headers-{R}", R, split="build")
          .tree("/usr/src/linux-headers-common", split="source")
          .link(f"/lib/modules/{R}/build", f"/usr/src/linux-headers-{R}")
          .link(f"/lib/modules/{R}/source", "/usr/src/linux-headers-common"))
    src = fs.find()
    assert src.kind == "matching" and compile_environment(src) == {}


def test_other_kernels_headers_linked_by_make_setup():
    # What this machine has: Debian's 6.1 headers linked for a 6.18 kernel.
    fs = (FakeFS().tree("/usr/src/linux-headers-6.1.0-57-amd64", "6.1.0-57-amd64", split="build")
          .tree("/usr/src/linux-headers-6.1.0-57-common", split="source")
          .link(f"/lib/modules/{R}/build", "/usr/src/linux-headers-6.1.0-57-amd64")
          .link(f"/lib/modules/{R}/source", "/usr/src/linux-headers-6.1.0-57-common"))
    src = fs.find()
    assert (src.kind, src.path) == ("other-kernel", f"/lib/modules/{R}/build")
    assert "6.1.0-57-amd64" in src.detail and "uprobe/USDT" in src.detail
    assert compile_environment(src) == {}


def test_bcc_kernel_source_wins():
    fs = (FakeFS().tree("/opt/headers", "6.8.0-1-generic").tree(f"/lib/modules/{R}/build", R)
          .file(kheaders.KHEADERS_ARCHIVE))
    src = fs.find({"BCC_KERNEL_SOURCE": "/opt/headers"})
    assert (src.kind, src.path) == ("BCC_KERNEL_SOURCE", "/opt/headers")
    assert "6.8.0-1-generic" in src.detail
    assert compile_environment(src) == {"BCC_KERNEL_SOURCE": "/opt/headers"}


def test_bcc_kernel_source_pointing_at_nothing_is_reported_not_ignored():
    fs = FakeFS().tree(f"/lib/modules/{R}/build", R)
    src = fs.find({"BCC_KERNEL_SOURCE": "/nowhere"})
    assert not src.ok and src.kind == "none" and "BCC_KERNEL_SOURCE=/nowhere" in src.detail
    assert compile_environment(src) == {}


def test_kheaders_archive_is_left_to_bcc():
    fs = FakeFS().file(kheaders.KHEADERS_ARCHIVE).tree(BUNDLED, "6.1.0-57-amd64")
    src = fs.find(in_container=True)
    assert (src.kind, src.path) == ("kheaders", kheaders.KHEADERS_ARCHIVE)
    assert "bcc extracts" in src.detail and f"/tmp/kheaders-{R}" in src.detail
    # BCC_KERNEL_SOURCE would stop bcc from using the archive.
    assert compile_environment(src) == {}


def test_kheaders_module_on_a_host_but_not_in_a_container():
    fs = FakeFS().file(f"/lib/modules/{R}/kernel/kernel/kheaders.ko.xz").tree(BUNDLED, "6.1.0-57-amd64")
    host = fs.find(in_container=False)
    assert host.kind == "kheaders" and "modprobe kheaders" in host.detail
    assert fs.find(in_container=True).kind == "bundled"  # no modprobe in a container


def test_headers_of_another_kernel_on_the_machine():
    fs = (FakeFS().tree("/lib/modules/6.5.0-1/build", "6.5.0-1")
          .tree("/lib/modules/6.10.2-3/build", "6.10.2-3")
          # A split Debian tree cannot go through BCC_KERNEL_SOURCE: not a candidate.
          .tree("/lib/modules/6.12.0-9/build", "6.12.0-9", split="build")
          .tree("/lib/modules/6.12.0-9/source", split="source")
          .tree(BUNDLED, "6.1.0-57-amd64"))
    src = fs.find()
    assert (src.kind, src.path) == ("other-kernel", "/lib/modules/6.10.2-3/build")
    assert compile_environment(src) == {"BCC_KERNEL_SOURCE": "/lib/modules/6.10.2-3/build"}


def test_bundled_headers_when_the_host_has_none():
    fs = FakeFS().tree(BUNDLED, "6.1.0-57-amd64")
    fs.file(f"{BUNDLED}/otel-ebpf-kernel-headers.txt", "Package: linux-headers-6.1.0-57-amd64\n")
    src = fs.find(in_container=True)
    assert (src.kind, src.path) == ("bundled", BUNDLED)
    assert "6.1.0-57-amd64" in src.detail and "uprobe/USDT" in src.detail
    assert compile_environment(src) == {"BCC_KERNEL_SOURCE": BUNDLED}


def test_bundled_headers_of_another_architecture_do_not_count():
    fs = FakeFS().tree(BUNDLED, "6.1.0-57-amd64", arch="x86")
    assert fs.find(machine="aarch64", in_container=True).kind == "none"
    arm = FakeFS().tree(BUNDLED, "6.1.0-57-arm64", arch="arm64")
    assert arm.find(machine="aarch64", in_container=True).kind == "bundled"


def test_host_headers_mounted_without_usr_src_fall_through():
    # -v /lib/modules:/lib/modules:ro without /usr/src: the links dangle.
    fs = (FakeFS().link(f"/lib/modules/{R}/build", f"/usr/src/linux-headers-{R}")
          .link(f"/lib/modules/{R}/source", "/usr/src/linux-headers-common"))
    src = fs.find(in_container=True)
    assert not src.ok and "/usr/src" in src.detail
    fs.tree(BUNDLED, "6.1.0-57-amd64")
    assert fs.find(in_container=True).kind == "bundled"


def test_nothing_found_advice_depends_on_where_the_agent_runs():
    fs = FakeFS()
    inside = fs.find(in_container=True)
    assert not inside.ok and inside.kind == "none" and inside.path is None
    assert "-v /lib/modules:/lib/modules:ro" in inside.detail and BUNDLED in inside.detail
    assert "make setup" not in inside.detail
    host = fs.find(in_container=False)
    assert "make setup" in host.detail and "-v /lib/modules" not in host.detail
    assert compile_environment(host) == {}


def test_order_of_preference():
    fs = (FakeFS().tree(f"/lib/modules/{R}/build", R).file(kheaders.KHEADERS_ARCHIVE)
          .tree("/lib/modules/6.1.0-1/build", "6.1.0-1").tree(BUNDLED, "6.1.0-57-amd64"))
    assert fs.find().kind == "matching"
    fs.dirs.discard(f"/lib/modules/{R}/build/include/generated")
    assert fs.find().kind == "kheaders"  # the running kernel's own, before another kernel's
    del fs.files[kheaders.KHEADERS_ARCHIVE]
    assert fs.find().kind == "other-kernel"
    fs.dirs.discard("/lib/modules/6.1.0-1/build/include/generated")
    assert fs.find().kind == "bundled"


def test_release_not_recorded_in_the_tree_counts_as_matching():
    fs = FakeFS().tree(f"/lib/modules/{R}/build")  # no utsrelease.h
    assert fs.find().kind == "matching"


def test_kinds_are_the_documented_ones():
    assert set(kheaders.KINDS) == {"BCC_KERNEL_SOURCE", "matching", "other-kernel", "kheaders", "bundled", "none"}


def test_container_markers():
    assert kheaders.running_in_container({}, lambda p: p == "/.dockerenv")
    assert kheaders.running_in_container({}, lambda p: p == "/run/.containerenv")
    assert kheaders.running_in_container({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, lambda p: False)
    assert not kheaders.running_in_container({}, lambda p: False)


def test_the_real_machine_gets_an_answer():
    import os
    import platform

    src = find_kernel_headers(platform.release(), os.environ)
    assert src.kind in kheaders.KINDS and (src.ok or src.detail)


# ---------------------------------------------------------------- doctor


def test_bpf_syscall_numbers_per_architecture():
    assert doctor.bpf_syscall_number("x86_64") == 321
    assert doctor.bpf_syscall_number("aarch64") == 280
    assert doctor.bpf_syscall_number("mips64") is None


def test_unknown_architecture_makes_the_bpf_probe_a_warning(monkeypatch):
    monkeypatch.setattr(doctor, "SYS_BPF", None)
    ok, err = doctor._bpf_map_create(doctor.BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    assert not ok and "not known" in err
    try:
        checks = {c.name: c for c in doctor.system_checks()}
    except ImportError as exc:  # the rest of doctor's imports (bcc) are not this test's business
        pytest.skip(f"doctor.system_checks() needs {exc}")
    assert not checks["bpf syscall"].ok and not checks["bpf syscall"].fatal
    assert not checks["ring buffers"].fatal


@pytest.mark.parametrize("kind,ok", [("bundled", True), ("kheaders", True), ("other-kernel", True), ("none", False)])
def test_doctor_kernel_headers_is_fatal_only_when_nothing_is_found(kind, ok, monkeypatch):
    path = None if kind == "none" else "/some/where"
    monkeypatch.setattr(doctor, "kernel_header_source",
                        lambda: kheaders.HeaderSource(path, kind, "what it means", R))
    found, detail = doctor.kernel_headers()
    assert found is ok
    assert detail.startswith(f"{kind}: ") if ok else detail == "what it means"
    if kind in ("bundled", "other-kernel"):
        assert "BCC_KERNEL_SOURCE=/some/where" in detail
