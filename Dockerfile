# otel-ebpf agent image, for linux/amd64 and linux/arm64:
#   docker build -t otel-ebpf .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/otel-ebpf:TAG .
# What it weighs and why: README.md ("Run the stack"), measured without Docker by
# deploy/agent/measure-image.sh. Privileges and mounts: docs/deploy.md.
#
# bcc comes from Debian (python3-bpfcc); the PyPI package named "bcc" is
# unrelated. Every PyPI package is pinned by constraints.txt.

# --- kernel headers for hosts that have none ------------------------------------
# Debian 12's current linux-headers for this architecture, merged into one tree
# and cut to what the probes reach. The agent uses them only when the host offers
# nothing better (BCC_KERNEL_SOURCE, /lib/modules/$(uname -r)/build, kheaders):
# see otel_ebpf/kheaders.py and `otel-ebpf doctor`.
FROM debian:12.8-slim AS kernel-headers
COPY deploy/agent/bundle-kernel-headers.sh /usr/local/bin/bundle-kernel-headers.sh
RUN sh /usr/local/bin/bundle-kernel-headers.sh /out \
 && rm -rf /var/lib/apt/lists/*

# --- the venv, built where pip and setuptools may live ---------------------------
FROM debian:12.8-slim AS venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
# --system-site-packages: the agent imports Debian's bcc from /usr/lib/python3/dist-packages.
RUN /usr/bin/python3 -m venv --system-site-packages /opt/otel-ebpf
# Only what the package build needs (.dockerignore keeps .venv, .git and tests out).
COPY constraints.txt pyproject.toml README.md /src/
COPY otel_ebpf /src/otel_ebpf
COPY probes /src/probes
COPY usdt /src/usdt
# PIP_CONSTRAINT pins the dependencies and also the isolated build environment
# (setuptools, wheel) that `-c` would not reach. pip, setuptools and wheel leave
# the venv afterwards: the agent does not need them (26 MB).
RUN PIP_CONSTRAINT=/src/constraints.txt /opt/otel-ebpf/bin/pip install \
        --no-cache-dir --disable-pip-version-check /src \
 && /opt/otel-ebpf/bin/pip uninstall -y -q pip setuptools wheel \
 && rm -rf /src

# --- the agent --------------------------------------------------------------------
FROM debian:12.8-slim
# python3-bpfcc brings python3 and libbcc with its compiler (LLVM 14, clang):
# most of the image. bpfcc-tools (the bcc command line tools) are not needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-bpfcc \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/otel-ebpf /opt/otel-ebpf
COPY --from=kernel-headers /out /usr/share/otel-ebpf/kernel-headers

ENV PATH=/opt/otel-ebpf/bin:$PATH \
    PYTHONUNBUFFERED=1

# Liveness on /healthz, readiness on /readyz (compose and deploy/kubernetes use them).
EXPOSE 9464 9465
# `docker run IMAGE` runs `otel-ebpf run`; compose passes `run --health-addr ...`.
ENTRYPOINT ["otel-ebpf"]
CMD ["run"]
