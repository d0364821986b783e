#!/bin/sh
# Print struct Port offsets for usdt/postgresql.yaml from a PostgreSQL server
# include directory (Debian: postgresql-server-dev-NN, plus libkrb5-dev for gssapi.h).
# Usage: tools/pg_port_offsets.sh /usr/include/postgresql/15/server
set -eu
inc=${1:?usage: $0 SERVER_INCLUDE_DIR}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/off.c" <<'C'
#include "postgres.h"
#include "libpq/libpq-be.h"
#include <stddef.h>
#include <stdio.h>
#undef printf
int main(void)
{
    printf("{laddr: %zu, raddr: %zu, database_name: %zu}\n", offsetof(Port, laddr),
           offsetof(Port, raddr), offsetof(Port, database_name));
    return 0;
}
C
cc -I"$inc" "$tmp/off.c" -o "$tmp/off"
"$tmp/off"
