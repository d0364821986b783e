# otel-ebpf agent image.
# bcc comes from Debian (python3-bpfcc for /usr/bin/python3); the PyPI package
# named "bcc" is unrelated. The venv sees it through --system-site-packages.
# Kernel headers are not in the image: bcc compiles against the host's, so
# mount /lib/modules and /usr/src read-only from the host (docker-compose.yml does).
FROM debian:12.8-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-bpfcc bpfcc-tools python3-venv \
 && rm -rf /var/lib/apt/lists/*

RUN /usr/bin/python3 -m venv --system-site-packages /opt/otel-ebpf

# Only what the package build needs (keeps .venv, .git and tests out of the image).
COPY pyproject.toml README.md /src/
COPY otel_ebpf /src/otel_ebpf
COPY probes /src/probes
COPY usdt /src/usdt
RUN /opt/otel-ebpf/bin/pip install --no-cache-dir /src && rm -rf /src

ENV PATH=/opt/otel-ebpf/bin:$PATH \
    PYTHONUNBUFFERED=1

# `docker run IMAGE` runs `otel-ebpf run`; compose passes `run --health-addr ...`.
ENTRYPOINT ["otel-ebpf"]
CMD ["run"]
