#!/bin/sh
# Create a self-signed certificate for the demo's HTTPS listener on first start,
# then exec the given command (nginx). A demo cert only: the load generator
# does not verify it.
set -eu
dir="${TLS_DIR:-/etc/nginx/tls}"  # TLS_DIR: for tests outside the image
if [ ! -s "$dir/server.crt" ] || [ ! -s "$dir/server.key" ]; then
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
        -subj "/CN=nginx" -addext "subjectAltName=DNS:nginx,DNS:localhost" \
        -keyout "$dir/server.key" -out "$dir/server.crt"
    chmod 600 "$dir/server.key"
fi
exec "$@"
