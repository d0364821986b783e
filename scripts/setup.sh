#!/bin/sh
# make setup: everything a fresh Debian 12 machine lacks to run and test otel-ebpf.
# Idempotent: a second run only checks and takes seconds. Run as root.
set -eu
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "make setup needs root (it installs packages and mounts tracefs)" >&2
    exit 1
fi

# Debian packages: bcc and its tools, the servers the demo and tests watch, the
# reference tools the benchmarks compare against, promtool for the alert rules.
PACKAGES="python3-bpfcc bpfcc-tools bpftrace python3-venv python3-dev gcc make binutils
systemtap-sdt-dev postgresql postgresql-contrib mariadb-server mariadb-client
nginx nginx-dev libssl-dev openssl curl wrk prometheus prometheus-alertmanager libpcre2-dev zlib1g-dev iproute2 util-linux libcap2-bin"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

KVER=$(uname -r)
# Debian's name for this machine's architecture: amd64 (x86_64) or arm64 (aarch64).
ARCH=$(dpkg --print-architecture)
case "$ARCH" in
    amd64|arm64) ;;
    *) echo "warning: otel-ebpf is built and tested for amd64 and arm64, not $ARCH" >&2 ;;
esac
need_headers=0
[ -e "/lib/modules/$KVER/build/include" ] || need_headers=1

apt_install() {
    # Keep package scripts from starting system services: the demo and tests start their own.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    rc=$?
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return $rc
}

if [ -n "$missing" ] || [ "$need_headers" = 1 ]; then
    say "apt-get update"
    apt-get update -q
fi
if [ -n "$missing" ]; then
    say "installing:$missing"
    # shellcheck disable=SC2086
    apt_install $missing
fi

if [ "$need_headers" = 1 ]; then
    if apt-cache show "linux-headers-$KVER" >/dev/null 2>&1; then
        say "installing linux-headers-$KVER"
        apt_install "linux-headers-$KVER"
    else
        # No package for this kernel: the nearest Debian headers work for uprobe/USDT programs.
        say "no linux-headers-$KVER package: using Debian's linux-headers-$ARCH as a fallback"
        apt_install "linux-headers-$ARCH"
        hdr=$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | grep -v common | sort -V | tail -1)
        common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
        [ -n "$hdr" ] && [ -n "$common" ] || { echo "kernel headers not found under /usr/src" >&2; exit 1; }
        mkdir -p "/lib/modules/$KVER"
        ln -sfn "$hdr" "/lib/modules/$KVER/build"
        ln -sfn "$common" "/lib/modules/$KVER/source"
        say "/lib/modules/$KVER/build -> $hdr"
    fi
fi

# tracefs and debugfs (bcc and bpftrace look there)
if [ ! -e /sys/kernel/tracing/uprobe_events ]; then
    say "mounting tracefs"
    mount -t tracefs tracefs /sys/kernel/tracing || echo "warning: could not mount tracefs" >&2
fi
if ! mountpoint -q /sys/kernel/debug; then
    say "mounting debugfs"
    mount -t debugfs debugfs /sys/kernel/debug || echo "warning: could not mount debugfs" >&2
fi

# The venv sees Debian's bcc through the system site packages.
if [ ! -x .venv/bin/python ]; then
    say "creating .venv from /usr/bin/python3"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.otel-ebpf-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing otel-ebpf with its test extras into .venv (versions pinned by constraints.txt)"
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
    echo "$want" > "$stamp"
fi
.venv/bin/python -c "import bcc, otel_ebpf" || { echo "bcc or otel_ebpf not importable from .venv" >&2; exit 1; }
say "setup done"
