#!/bin/sh
# Bundle one Debian kernel's headers as a single directory tree that bcc can
# compile against (BCC_KERNEL_SOURCE=DIR), for hosts that have no headers of
# their own. Run as root in a Debian 12 container (the Dockerfile's first stage)
# or chroot; writes DIR and nothing else outside a temporary directory.
#
# The agent's programs are uprobe/USDT programs: they read user memory and
# pt_regs, never kernel structures, so headers of another kernel release of the
# same architecture compile them correctly (tests/integration runs on a 6.18
# kernel with Debian's 6.1 headers). What they need is the architecture's asm
# headers and the generic include/ tree; the rest of the package (kbuild
# scripts, Module.symvers, other architectures) is dropped.
set -eu

out=${1:?usage: bundle-kernel-headers.sh OUTDIR}
arch=$(dpkg --print-architecture)
case "$arch" in
    amd64) srcarch=x86 ;;
    arm64) srcarch=arm64 ;;
    *) echo "bundle-kernel-headers.sh: no kernel headers bundled for $arch" >&2; exit 1 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

if [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
    apt-get update -q
fi
# linux-headers-<arch> is the metapackage of Debian 12's current kernel ABI:
# resolve it to the versioned packages and download those two alone (their
# dependencies, linux-kbuild and gcc, only build modules).
pkg=$(apt-cache depends "linux-headers-$arch" \
      | sed -n "s/^ *Depends: \(linux-headers-[0-9][^ ]*-$arch\)\$/\1/p" | head -n 1)
[ -n "$pkg" ] || { echo "cannot resolve linux-headers-$arch" >&2; exit 1; }
common=$(apt-cache depends "$pkg" \
         | sed -n 's/^ *Depends: \(linux-headers-[0-9][^ ]*-common[^ ]*\)$/\1/p' | head -n 1)
[ -n "$common" ] || { echo "cannot resolve the -common package of $pkg" >&2; exit 1; }
apt-get download -q "$pkg" "$common" 2>&1 | grep -v 'unsandboxed' || true
for deb in ./*.deb; do dpkg-deb -x "$deb" root; done

src=$(ls -d root/usr/src/linux-headers-*-common* | head -n 1)
bld=$(ls -d root/usr/src/linux-headers-*-"$arch" | head -n 1)

# Debian splits the tree: -common holds include/ and arch/*/include, the
# per-architecture package the generated headers and the configuration. bcc
# takes one directory when BCC_KERNEL_SOURCE is set, so merge them.
mkdir -p "$out"
cp -a "$src/include" "$out/include"
mkdir -p "$out/arch"
cp -a "$src/arch/$srcarch" "$out/arch/$srcarch"
cp -a "$bld/include/." "$out/include/"
cp -a "$bld/arch/$srcarch/." "$out/arch/$srcarch/"

# Keep arch/<arch>/include only (Kconfig, Makefiles and tools are for kbuild).
find "$out/arch/$srcarch" -mindepth 1 -maxdepth 1 ! -name include -exec rm -rf {} +
# Of include/, keep what bcc's helpers and the probes' <uapi/linux/ptrace.h>
# reach (measured with strace while compiling all four probe programs: files
# under linux, linux/byteorder, uapi, asm-generic, vdso, generated) with some
# margin: config, and the core subdirectories of linux/ that generic headers
# pull in. Driver headers (linux/mfd, linux/mlx5, uapi/drm, ...) go: 20 MB.
# tests/unit/test_deploy.py checks that every #include of probes/ stays inside
# these lists.
KEEP_INCLUDE_DIRS="asm-generic config generated linux uapi vdso"
KEEP_LINUX_SUBDIRS="atomic byteorder device perf sched unaligned"
KEEP_UAPI_SUBDIRS="asm-generic linux"
keep_only() {  # keep_only DIR "NAMES": remove the subdirectories of DIR not named
    for d in "$1"/*/; do
        d=${d%/}
        case " $2 " in *" ${d##*/} "*) ;; *) rm -rf "$d" ;; esac
    done
}
for d in "$out"/include/*; do  # top level: files and directories
    case " $KEEP_INCLUDE_DIRS " in *" ${d##*/} "*) ;; *) rm -rf "$d" ;; esac
done
keep_only "$out/include/linux" "$KEEP_LINUX_SUBDIRS"
keep_only "$out/include/uapi" "$KEEP_UAPI_SUBDIRS"

# Dangling links into packages we do not ship.
find "$out" -xtype l -delete

{
    echo "# Kernel headers bundled by deploy/agent/bundle-kernel-headers.sh"
    dpkg-deb -f "$(ls ./"$pkg"_*.deb)" Package Version
    dpkg-deb -f "$(ls ./"$common"_*.deb)" Package Version
    echo "Architecture: $arch"
} > "$out/otel-ebpf-kernel-headers.txt"
chmod -R go-w "$out"
echo "bundled $pkg ($(du -sh "$out" | cut -f1)) into $out"
