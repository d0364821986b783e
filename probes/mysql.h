/* MySQL / MariaDB: the record probes/mysql.c sends per finished statement.
 * Decoded by otel_ebpf/targets/mysql.py (RECORD), checked by tests/unit/test_contract.py. */
#ifndef OTEL_EBPF_MYSQL_H
#define OTEL_EBPF_MYSQL_H

#ifndef QUERY_MAX
#define QUERY_MAX 1024
#endif
#ifndef TAIL_MAX
#define TAIL_MAX 256
#endif
#define DB_MAX 64

/* mysql_event.flags */
#define FLAG_MARIADB 1
#define FLAG_USDT 2
#define FLAG_FAILED 4
#define FLAG_PREPARED 8  /* a COM_STMT_EXECUTE: the text is the prepared statement's */
#define FLAG_PREPARE 16  /* a COM_STMT_PREPARE that failed */
#define FLAG_TEXT_READY 32 /* the kernel's own: the deferred text is in query[] already */

struct mysql_event {
    u64 start_ns;
    u64 end_ns;
    u64 connection_id; /* USDT only */
    u64 stmt;          /* COM_STMT_EXECUTE: the Prepared_statement it runs; USDT: the query's
                        * address (both: text copied at the end, for kept spans only) */
    u32 pid;           /* tgid: the server process */
    u32 tid;
    u32 error_code;    /* server error number (1064, 1062, ...), 0 if none seen */
    u32 flags;
    u32 query_len;     /* bytes of query text the server had */
    u32 copied;        /* bytes in query[] */
    u32 tail_len;      /* bytes in tail[]: the last ones of a query longer than QUERY_MAX */
    u32 operation;     /* sql_operation() code of the text, for the histogram */
    char db[DB_MAX];
    char query[QUERY_MAX];
    char tail[TAIL_MAX];
};

/* What Prepared_statement::prepare saw, kept per statement object for its executions. */
struct stmt_text {
    u32 len;
    u32 copied;
    u32 tail_len;
    u32 operation;
    char text[QUERY_MAX];
    char tail[TAIL_MAX];
};

#endif
