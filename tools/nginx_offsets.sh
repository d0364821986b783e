#!/bin/sh
# Print one entry of usdt/nginx-offsets.yaml: the ngx_http_request_t, ngx_connection_t
# and ngx_table_elt_t member offsets the nginx target reads, for the build that an
# nginx source or header tree describes, keyed by nginx version and module signature
# (NGX_MODULE_SIGNATURE: nginx embeds it in its binary, and builds of one version with
# one signature share these layouts - nginx checks the same before loading a module).
#
# Usage: tools/nginx_offsets.sh [--object FILE.o] [SRC_DIR [CONFIGURE_ARG...]]
#   SRC_DIR        nginx source tree, or Debian's nginx-dev headers (default /usr/share/nginx/src)
#   CONFIGURE_ARG  the build's ./configure arguments (`nginx -V`); default: SRC_DIR/conf_flags
#                  (nginx-dev ships the arguments of Debian's own build there)
#   --object FILE  also write an object compiled with -g whose DWARF has these types
#                  (tests hold the DWARF reader against the printed offsets)
# Needs gcc and the libraries ./configure looks for (libpcre2-dev, zlib1g-dev, libssl-dev).
# The tree is copied to a temp dir; nothing is built but one small C file.
set -eu

object=""
if [ "${1:-}" = "--object" ]; then
    object=$(realpath -m "${2:?--object needs a file name}")
    shift 2
fi
src=${1:-/usr/share/nginx/src}
[ $# -gt 0 ] && shift
[ -x "$src/configure" ] || [ -x "$src/auto/configure" ] || {
    echo "$0: $src is no nginx source tree (no configure): apt-get install nginx-dev" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$src/." "$tmp/"
cd "$tmp"
[ -x ./configure ] || cp auto/configure ./configure

if [ $# -eq 0 ]; then
    [ -f conf_flags ] || { echo "$0: no configure arguments given and no $src/conf_flags" >&2; exit 1; }
    # conf_flags is a bash array assignment: NGX_CONF_FLAGS=( --with-... ); read it without bash.
    set -- $(sed -n 's/^NGX_CONF_FLAGS=(\(.*\))$/\1/p' conf_flags)
fi
# Only the feature switches shape the layouts; paths are left out of the entry.
configure_args=$(printf '%s\n' "$@" | grep -E '^--with' | tr '\n' ' ' | sed 's/ $//')
./configure "$@" > configure.log 2>&1 || { tail -20 configure.log >&2; echo "$0: ./configure failed" >&2; exit 1; }

cat > offsets.c <<'C'
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <stdio.h>
#include <stddef.h>

/* Referenced so that a -g object describes these types in its DWARF. */
ngx_http_request_t *otel_ebpf_request;
ngx_connection_t *otel_ebpf_connection;
ngx_table_elt_t *otel_ebpf_table_elt;

#define M(type, member) printf("%s" #member ": %zu", first ? "" : ", ", offsetof(type, member)); first = 0

int main(int argc, char **argv)
{
    int first;
    printf("  - version: \"%s\"\n", NGINX_VERSION);
    printf("    signature: \"%s\"\n", NGX_MODULE_SIGNATURE);
    printf("    configure: \"%s\"\n", argc > 1 ? argv[1] : "");
    first = 1;
    printf("    request: {");
    M(ngx_http_request_t, connection); M(ngx_http_request_t, main); M(ngx_http_request_t, method);
    M(ngx_http_request_t, http_version); M(ngx_http_request_t, unparsed_uri);
    M(ngx_http_request_t, headers_out.status); M(ngx_http_request_t, err_status);
    M(ngx_http_request_t, headers_in.user_agent); M(ngx_http_request_t, start_sec);
    M(ngx_http_request_t, start_msec); M(ngx_http_request_t, headers_in.headers);
    printf("}\n");
    first = 1;
    printf("    connection: {");
    M(ngx_connection_t, sockaddr); M(ngx_connection_t, local_sockaddr); M(ngx_connection_t, ssl);
    M(ngx_connection_t, sent);
    printf("}\n");
    first = 1;
    printf("    table_elt: {");
    M(ngx_table_elt_t, value); M(ngx_table_elt_t, hash); M(ngx_table_elt_t, key);
    printf(", \"@size\": %zu", sizeof(ngx_table_elt_t));
    printf("}\n");
    return 0;
}
C
includes=""
for d in src/core src/event src/event/modules src/os/unix src/http src/http/modules src/http/v2 objs; do
    includes="$includes -I$d"
done
# shellcheck disable=SC2086
cc $includes offsets.c -o offsets
if [ -n "$object" ]; then
    # shellcheck disable=SC2086
    cc -g -c $includes offsets.c -o "$object"
fi
./offsets "$(printf '%s' "$configure_args" | sed 's/"/\\"/g')"
