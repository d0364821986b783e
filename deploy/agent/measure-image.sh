#!/bin/sh
# Measure what the agent image (../../Dockerfile) weighs without a Docker engine:
# build the same file system with debootstrap and chroot, layer by layer, and
# print the size of each layer and of the largest parts.
#
#   sudo sh deploy/agent/measure-image.sh [WORKDIR]     (default /var/tmp/otel-ebpf-image)
#
# The steps mirror the Dockerfile; tests/unit/test_deploy.py checks that both
# install the same Debian packages. debian:12.8-slim is approximated by a
# `debootstrap --variant=minbase bookworm` tree with the slim image's dpkg
# excludes (no docs, man pages, locales) and without apt lists and caches.
# Needs root, debootstrap, and the network (Debian mirror, PyPI) - or the pip
# configuration of the machine, which is passed through.
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/var/tmp/otel-ebpf-image}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root="$work/rootfs"
builder="$work/builder"

say() { printf '==> %s\n' "$*" >&2; }
# Apparent size in MB of 10^6 bytes, the unit `docker images` uses.
size() { du -sxb "$@" 2>/dev/null | awk '{s += $1} END {printf "%d", s / 1000000 + 0.5}'; }

unmount() {
    for m in proc opt/wheels opt/pypi opt/pypi-more; do
        if mountpoint -q "$1/$m" 2>/dev/null; then umount "$1/$m"; fi
    done
    rm -f "$1/etc/host-pip-ca.crt" "$1/etc/pip.conf"
    rmdir "$1/opt/wheels" "$1/opt/pypi" "$1/opt/pypi-more" 2>/dev/null || true
}
cleanup() { unmount "$root"; unmount "$builder"; unmount "$work/venv"; }
trap cleanup EXIT

in_root() {  # run a shell command inside a tree, with /proc and the host's pip mirrors
    r=$1; shift
    mountpoint -q "$r/proc" || mount -t proc proc "$r/proc"
    for m in /opt/wheels /opt/pypi /opt/pypi-more; do
        if [ -d "$m" ]; then mkdir -p "$r$m"; mountpoint -q "$r$m" || mount --bind "$m" "$r$m"; fi
    done
    cp /etc/resolv.conf "$r/etc/resolv.conf"
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$r/etc/pip.conf"
    cert=""  # a TLS-intercepting proxy's CA, when this machine's pip needs one
    if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
        cp "$PIP_CERT" "$r/etc/host-pip-ca.crt"; cert=/etc/host-pip-ca.crt
    fi
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive \
        PIP_FIND_LINKS="${PIP_FIND_LINKS:-}" PIP_DEFAULT_TIMEOUT=180 PIP_CERT="$cert" \
        chroot "$r" /bin/sh -eu -c "$*"
    unmount "$r"
}

slim_base() {  # debian:12.8-slim, approximately
    r=$1
    if [ ! -x "$work/base/bin/sh" ]; then
        say "debootstrap bookworm (minbase) into $work/base"
        debootstrap --variant=minbase bookworm "$work/base" "$mirror" >"$work/debootstrap.log"
        mkdir -p "$work/base/etc/dpkg/dpkg.cfg.d"
        cat >"$work/base/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
        find "$work/base/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
        rm -rf "$work/base/usr/share/man/"* "$work/base/usr/share/info/"* "$work/base/usr/share/groff/"*
        find "$work/base/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
        rm -rf "$work/base/var/lib/apt/lists/"* "$work/base/var/cache/apt/"*.bin \
               "$work/base/var/cache/apt/archives/"*.deb "$work/base/var/log/"*
    fi
    rm -rf "$r"
    cp -a "$work/base" "$r"
}

[ "$(id -u)" = 0 ] || { echo "measure-image.sh needs root (debootstrap, chroot)" >&2; exit 1; }

mkdir -p "$work"
slim_base "$root"
base=$(size "$root")

say "stage venv: python3-venv, then the venv pinned by constraints.txt"
venv="$work/venv"
slim_base "$venv"
in_root "$venv" 'apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends python3-venv >/dev/null
/usr/bin/python3 -m venv --system-site-packages /opt/otel-ebpf'
mkdir -p "$venv/src"
cp -a "$repo/constraints.txt" "$repo/pyproject.toml" "$repo/README.md" "$repo/otel_ebpf" \
      "$repo/probes" "$repo/usdt" "$venv/src/"
find "$venv/src" -name __pycache__ -prune -exec rm -rf {} +
in_root "$venv" 'PIP_CONSTRAINT=/src/constraints.txt /opt/otel-ebpf/bin/pip install -q \
    --no-cache-dir --disable-pip-version-check /src
/opt/otel-ebpf/bin/pip uninstall -y -q pip setuptools wheel
rm -rf /src /root/.cache'

say "stage kernel-headers"
slim_base "$builder"
cp "$repo/deploy/agent/bundle-kernel-headers.sh" "$builder/usr/local/bin/"
in_root "$builder" 'sh /usr/local/bin/bundle-kernel-headers.sh /out >/dev/null'

say "final stage, layer 1: python3-bpfcc"
in_root "$root" 'apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends python3-bpfcc >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log'
after_apt=$(size "$root")

say "final stage, layer 2: COPY --from=venv /opt/otel-ebpf"
cp -a "$venv/opt/otel-ebpf" "$root/opt/otel-ebpf"
after_venv=$(size "$root")

say "final stage, layer 3: COPY --from=kernel-headers /out"
mkdir -p "$root/usr/share/otel-ebpf"
cp -a "$builder/out" "$root/usr/share/otel-ebpf/kernel-headers"
total=$(size "$root")

say "check: the image's python imports bcc and the pinned exporters, and finds the bundled headers"
in_root "$root" '/opt/otel-ebpf/bin/python -c "
import bcc, grpc, prometheus_client, opentelemetry.exporter.otlp.proto.grpc.trace_exporter
import opentelemetry.exporter.otlp.proto.http.trace_exporter
from otel_ebpf import kheaders
print(kheaders.find_kernel_headers(\"0.0.0-none\", {}, in_container=True))"' >&2

cleanup
echo
echo "layer                                   MB (10^6 bytes, apparent size, as docker images counts)"
printf '%-38s %4d\n' "debian:12.8-slim (approximation)" "$base"
printf '%-38s %4d\n' "python3-bpfcc + its dependencies" "$((after_apt - base))"
printf '%-38s %4d\n' "venv: otel-ebpf + pinned PyPI deps" "$((after_venv - after_apt))"
printf '%-38s %4d\n' "bundled kernel headers" "$((total - after_venv))"
printf '%-38s %4d\n' "total (uncompressed)" "$total"
echo
echo "largest parts (MB):"
lib=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for p in "usr/lib/$lib/libLLVM-14.so.1" "usr/lib/$lib/libclang-cpp.so.14" "usr/lib/$lib/libbcc.so.0.26.0" \
         usr/lib/python3.11 "usr/lib/python3/dist-packages" opt/otel-ebpf usr/share/otel-ebpf/kernel-headers; do
    [ -e "$root/$p" ] && printf '  %-44s %4d\n' "/$p" "$(size "$(readlink -f "$root/$p")")"
done
echo "  in the venv:"
du -sxb "$root"/opt/otel-ebpf/lib/python3.11/site-packages/* 2>/dev/null | sort -rn | head -n 8 \
    | while read -r b path; do printf '    %-42s %4d\n' "${path##*/}" "$(((b + 500000) / 1000000))"; done
