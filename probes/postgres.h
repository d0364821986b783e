/* PostgreSQL: the record probes/postgres.c sends per finished statement.
 * Decoded by otel_ebpf/targets/postgres.py (RECORD), checked by tests/unit/test_contract.py. */
#ifndef OTEL_EBPF_POSTGRES_H
#define OTEL_EBPF_POSTGRES_H

#ifndef QUERY_MAX
#define QUERY_MAX 1024
#endif
#ifndef TAIL_MAX
#define TAIL_MAX 256
#endif

/* pg_event.kind */
#define KIND_DONE 1
#define KIND_ABORT 2          /* failed with the SQLSTATE errcode() saw */
#define KIND_ABORT_NO_CODE 3  /* aborted, no error seen: a ROLLBACK (sent only when errstart() is not probed) */

/* pg_event.protocol: how the statement reached the server */
#define PROTOCOL_SIMPLE 1    /* a Query message (psql, psycopg2, pgbench -M simple) */
#define PROTOCOL_EXTENDED 2  /* an Execute message (Parse/Bind/Execute: JDBC, asyncpg, psycopg 3) */
#define PROTOCOL_MESSAGE 3   /* a Parse or Bind message that failed before any Execute */

struct pg_event {
    u64 start_ns;
    u64 end_ns;
    u32 pid;
    u32 postmaster_pid;
    u32 kind;
    u32 sqlstate;
    u8 raddr[28];    /* struct sockaddr (in, in6 or un prefix) of the client */
    u8 laddr[64];    /* the server's side: its port, or the unix socket path */
    char database[64];
    u32 query_len;   /* bytes in query[], without the closing NUL */
    u32 protocol;
    u32 tail_len;    /* bytes in tail[]: the query was longer than QUERY_MAX - 1 */
    u32 flags;
    char query[QUERY_MAX];
    char tail[TAIL_MAX]; /* the last bytes of a longer query (sqlcommenter puts its comment there) */
};

#endif
