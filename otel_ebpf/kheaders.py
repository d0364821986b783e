"""Which kernel headers bcc will compile the probes against, and what that means.

bcc compiles the BPF C at run time against a kernel header tree. Where it looks:

1. ``BCC_KERNEL_SOURCE`` when set (one self-contained tree);
2. ``/lib/modules/$(uname -r)/build`` (with ``.../source`` beside it when a
   distribution splits the tree, as Debian does);
3. ``/sys/kernel/kheaders.tar.xz`` (``CONFIG_IKHEADERS``), which bcc extracts
   itself into ``/tmp/kheaders-$(uname -r)`` when 2. has no usable tree.

The agent's programs are uprobe/USDT programs: they read user memory and
``pt_regs``, never a kernel structure. Headers of another kernel release of the
same architecture therefore compile them correctly (the integration tests run on
a 6.18 kernel with Debian's 6.1 headers), which is what the "other-kernel" and
"bundled" sources rely on. The image ships one such tree (``BUNDLED_HEADERS``,
made by deploy/agent/bundle-kernel-headers.sh) for hosts that have none:
Docker Desktop, Container-Optimized OS, minimal cloud images.

``find_kernel_headers`` is pure (the file system comes in as functions) so that
doctor and the tests can ask it anything; ``compile_environment`` says which
environment variables make bcc use the source found.
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from typing import Callable, Mapping

BUNDLED_HEADERS = "/usr/share/otel-ebpf/kernel-headers"
KHEADERS_ARCHIVE = "/sys/kernel/kheaders.tar.xz"
MODULES_DIR = "/lib/modules"

# uname -m -> the kernel's arch/ directory (bcc's KBuildHelper does the same mapping).
SRCARCH = {"x86_64": "x86", "i686": "x86", "i386": "x86", "aarch64": "arm64", "arm64": "arm64",
           "riscv64": "riscv", "s390x": "s390", "ppc64le": "powerpc", "ppc64": "powerpc",
           "loongarch64": "loongarch"}

KINDS = ("BCC_KERNEL_SOURCE", "matching", "other-kernel", "kheaders", "bundled", "none")


@dataclass(frozen=True)
class HeaderSource:
    """Where bcc's headers come from: `path` is None when nothing usable was found."""

    path: str | None
    kind: str  # one of KINDS
    detail: str  # what it means, or what to do when nothing was found
    release: str = ""  # the running kernel's release (uname -r)

    @property
    def ok(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return f"{self.kind}: {self.path} ({self.detail})" if self.path else f"none: {self.detail}"


def compile_environment(source: HeaderSource) -> dict[str, str]:
    """The environment variables bcc needs to compile against `source`.

    BCC_KERNEL_SOURCE when the tree is not the /lib/modules/R/build bcc finds by itself;
    nothing for kheaders, whose archive bcc only extracts when BCC_KERNEL_SOURCE is unset."""
    if source.path is None or source.kind == "kheaders":
        return {}
    if source.release and source.path == f"{MODULES_DIR}/{source.release}/build":
        return {}
    return {"BCC_KERNEL_SOURCE": source.path}


def find_kernel_headers(
    release: str,
    env: Mapping[str, str],
    exists: Callable[[str], bool] = os.path.exists,
    *,
    isdir: Callable[[str], bool] = os.path.isdir,
    listdir: Callable[[str], list[str]] = os.listdir,
    realpath: Callable[[str], str] = os.path.realpath,
    read_text: Callable[[str], str] | None = None,
    machine: str | None = None,
    in_container: bool | None = None,
    bundled: str = BUNDLED_HEADERS,
) -> HeaderSource:
    """The header tree bcc will use for kernel `release`, best first (see the module doc)."""
    read = read_text or _read_text
    machine = machine or platform.machine()
    srcarch = SRCARCH.get(machine, machine)
    if in_container is None:
        in_container = running_in_container(env, exists)

    def tree_release(path: str) -> str:
        """UTS_RELEASE of a header tree ('' when it does not say)."""
        for name, pattern in (("include/generated/utsrelease.h", r'UTS_RELEASE\s+"([^"]+)"'),
                              ("include/config/kernel.release", r"(\S+)")):
            try:
                m = re.search(pattern, read(f"{path}/{name}"))
            except OSError:
                continue
            if m:
                return m.group(1)
        return ""

    def self_contained(path: str) -> bool:
        """One directory bcc can compile against alone (BCC_KERNEL_SOURCE=path)."""
        return (exists(f"{path}/include/linux/kconfig.h") and isdir(f"{path}/include/generated")
                and isdir(f"{path}/arch/{srcarch}/include"))

    def where(path: str) -> str:
        real = realpath(path)
        return path if real == path else f"{path} -> {real}"

    # 1. BCC_KERNEL_SOURCE wins in bcc whatever it points at.
    forced = env.get("BCC_KERNEL_SOURCE", "").strip()
    if forced:
        if self_contained(forced):
            rel = tree_release(forced)
            return HeaderSource(forced, "BCC_KERNEL_SOURCE", _about_release(
                "set in the environment", rel, release), release)
        return HeaderSource(None, "none", (
            f"BCC_KERNEL_SOURCE={forced} is not a kernel header tree for {machine} (no include/linux/"
            f"kconfig.h, include/generated or arch/{srcarch}/include): bcc would fail to compile; "
            "unset it or point it at one"), release)

    # 2. /lib/modules/R/build, as bcc finds it without help.
    kdir = f"{MODULES_DIR}/{release}"
    build, src = f"{kdir}/build", f"{kdir}/source"
    split = isdir(build) and isdir(src)  # bcc then compiles in source/ and adds build/'s includes
    usable = (exists(f"{src}/include/linux/kconfig.h") and isdir(f"{build}/include/generated")
              if split else self_contained(build))
    if usable:
        rel = tree_release(build)
        if not rel or rel == release:
            return HeaderSource(build, "matching", f"{where(build)}: headers of the running kernel",
                                release)
        return HeaderSource(build, "other-kernel", (
            f"{where(build)}: headers of {rel}, linked for this {release} kernel; fine for the "
            "uprobe/USDT programs, which read no kernel structure"), release)

    # 3. The running kernel's own headers, built in (CONFIG_IKHEADERS).
    if exists(KHEADERS_ARCHIVE):
        return HeaderSource(KHEADERS_ARCHIVE, "kheaders", (
            "the running kernel's own headers (CONFIG_IKHEADERS): bcc extracts the archive itself "
            f"into /tmp/kheaders-{release} at the first compile, which needs a writable /tmp "
            "(about 40 MB) and BCC_KERNEL_SOURCE unset"), release)
    if not in_container and _kheaders_module(kdir, exists):
        return HeaderSource(f"{kdir}/kernel/kernel/kheaders.ko", "kheaders", (
            "the kheaders module of the running kernel: bcc loads it (modprobe kheaders) and "
            f"extracts {KHEADERS_ARCHIVE} into /tmp/kheaders-{release} at the first compile"), release)

    # 4. Headers of another kernel on this machine (self-contained trees only: a split
    #    Debian tree needs /lib/modules/R/{build,source} links, which `make setup` makes).
    others = []
    try:
        names = listdir(MODULES_DIR)
    except OSError:
        names = []
    for name in names:
        if name != release and self_contained(f"{MODULES_DIR}/{name}/build"):
            others.append(name)
    if others:
        name = max(others, key=_version_key)
        path = f"{MODULES_DIR}/{name}/build"
        return HeaderSource(path, "other-kernel", (
            f"{where(path)}: headers of {name}, not of the running {release}; fine for the "
            "uprobe/USDT programs, which read no kernel structure"), release)

    # 5. The image's own tree.
    if self_contained(bundled):
        rel = tree_release(bundled)
        return HeaderSource(bundled, "bundled", (
            f"headers of {rel or 'another kernel'} shipped in the image for hosts without headers; "
            "fine for the uprobe/USDT programs, which read no kernel structure"), release)

    # 6. Nothing: say what to do where we are.
    why = f"no kernel headers for {release}: {build} is missing or incomplete"
    if exists(build) or exists(src):
        why += " (a link whose target is not visible here?)"
    if in_container:
        advice = ("mount the host's headers read-only (-v /lib/modules:/lib/modules:ro "
                  "-v /usr/src:/usr/src:ro), or run the otel-ebpf image, which bundles headers in "
                  f"{bundled}, or set BCC_KERNEL_SOURCE to a header tree")
    else:
        advice = ("run `make setup` (it installs linux-headers for this kernel, or links the nearest "
                  "Debian linux-headers package), or install your distribution's kernel headers, "
                  "or set BCC_KERNEL_SOURCE to a header tree")
    return HeaderSource(None, "none", f"{why}; {advice}", release)


def running_in_container(env: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Docker, Podman or Kubernetes, from markers that survive `pid: host` (/proc/1 is the host's)."""
    return bool(exists("/.dockerenv") or exists("/run/.containerenv")
                or env.get("KUBERNETES_SERVICE_HOST") or env.get("container"))


def _kheaders_module(kdir: str, exists: Callable[[str], bool]) -> bool:
    base = f"{kdir}/kernel/kernel/kheaders.ko"
    return any(exists(base + suffix) for suffix in ("", ".xz", ".zst", ".gz"))


def _about_release(what: str, tree: str, running: str) -> str:
    if not tree or tree == running:
        return what
    return (f"{what}; headers of {tree}, not of the running {running}: fine for the uprobe/USDT "
            "programs, which read no kernel structure")


def _version_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-+~_]", name))


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read(4096)
