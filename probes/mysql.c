/* MySQL and MariaDB: one record per finished statement, by one of two ways in.
 *
 * USDT (builds with DTrace): query__start(query, connid, db, user, host) and
 * query__done(status) are paired by thread (query__done has no connection id).
 * The server fires them per statement; status = thd->is_error().
 *
 * Uprobes (MariaDB from distributions, MySQL 8): dispatch_command entry and return,
 * paired by thread. The server writes its response into the buffer the packet came
 * in (one NET buffer for both ways), so the entry copies the query text.
 *
 * Prepared statements (uprobes, both ways in when the symbols are there):
 * Prepared_statement::prepare(this, text, length) keeps the statement's text per
 * statement object (`stmts`); a COM_STMT_EXECUTE (or MariaDB's COM_STMT_BULK_EXECUTE)
 * opens an entry at dispatch_command, Prepared_statement::execute_loop(this, ...) names
 * the statement it runs, and the return copies that text (with its ? placeholders: the
 * parameter values are never read). A COM_STMT_PREPARE is a span only when it fails.
 *
 * Errors: on_error_sent (the error packet the client gets) or on_error_raised
 * (my_message_sql) store the server's error number in the thread's statement.
 * On the uprobe path a stored number means failed; on the USDT path query__done's
 * status decides and the number only names the error.
 *
 * The connection's default database: THD::set_db / THD::reset_db keep it per
 * THD (the connection object: a thread pool runs one connection on many threads).
 *
 * -D cflags (from otel_ebpf/targets/mysql.py):
 *   QUERY_MAX, TAIL_MAX   powers of two, bytes of query text copied from its head / tail
 *   DB_SYSTEM_MARIADB     1 for MariaDB, 0 for MySQL (goes into records and dim)
 *   DISPATCH_LAYOUT       1: (command, thd, packet, length)  2: (thd, COM_DATA *, command)
 *   DISPATCH_QUERY        1: dispatch_command traces COM_QUERY (0 when USDT does)
 *   TRACK_INIT_DB         1: take the database from COM_INIT_DB (no THD::set_db probes)
 *   ERROR_IGNORE_FLAGS    my_message_sql flags that mean "not an error" (MariaDB notes, warnings)
 *   ARG_QUERY, ARG_CONNID, ARG_DB, ARG_STATUS   USDT argument expressions
 *   STMT_TEXT_ARG, STMT_LENGTH_ARG   where Prepared_statement::prepare has its text
 */
#include "common.h"
#include "mysql.h"

#ifndef DB_SYSTEM_MARIADB
#define DB_SYSTEM_MARIADB 1
#endif
#ifndef DISPATCH_LAYOUT
#define DISPATCH_LAYOUT 1
#endif
#ifndef DISPATCH_QUERY
#define DISPATCH_QUERY 1
#endif
#ifndef TRACK_INIT_DB
#define TRACK_INIT_DB 0
#endif
#ifndef ERROR_IGNORE_FLAGS
#define ERROR_IGNORE_FLAGS 0
#endif
#ifndef ARG_QUERY
#define ARG_QUERY 0ULL
#endif
#ifndef ARG_CONNID
#define ARG_CONNID 0ULL
#endif
#ifndef ARG_DB
#define ARG_DB 0ULL
#endif
#ifndef ARG_STATUS
#define ARG_STATUS 0ULL
#endif
#ifndef STMTS_MAX
#define STMTS_MAX 4096
#endif
#ifndef STMT_TEXT_ARG /* Prepared_statement::prepare's text and length arguments */
#define STMT_TEXT_ARG PT_REGS_PARM2(ctx)
#endif
#ifndef STMT_LENGTH_ARG
#define STMT_LENGTH_ARG PT_REGS_PARM3(ctx)
#endif

#define LAYOUT_COMMAND_FIRST 1
#define LAYOUT_COM_DATA 2

#define COM_QUIT 1
#define COM_INIT_DB 2
#define COM_QUERY 3
#define COM_STMT_PREPARE 22
#define COM_STMT_EXECUTE 23
#define COM_STMT_BULK_EXECUTE 250 /* MariaDB */

/* error number in dim for a failure whose number is unknown */
#define ERROR_UNKNOWN 0xFFFFFF

struct db_name {
    char name[DB_MAX];
};

/* struct st_mysql_const_lex_string (LEX_CSTRING) */
struct lex_cstring {
    u64 str;
    u64 length;
};

/* A server object (THD, Prepared_statement) of one process: one program serves every
 * process of the binary, and addresses repeat across them. */
struct object_key {
    u64 addr;
    u32 tgid;
    u32 pad;
};

BPF_TABLE("lru_hash", u32, struct mysql_event, inflight, INFLIGHT_MAX);
BPF_TABLE("lru_hash", struct object_key, struct db_name, thd_db, INFLIGHT_MAX);
BPF_TABLE("lru_hash", struct object_key, struct stmt_text, stmts, STMTS_MAX);
BPF_PERCPU_ARRAY(scratch, struct mysql_event, 1);
BPF_PERCPU_ARRAY(stmt_scratch, struct stmt_text, 1);

/* dim: bit 40 MariaDB, bits 8..31 error number (0 = success), bits 0..7 operation. */
static __always_inline u64 hist_dim(struct mysql_event *ev, int failed)
{
    u64 error = 0;
    if (failed)
        error = ev->error_code ? (ev->error_code & ERROR_UNKNOWN) : ERROR_UNKNOWN;
    return ((u64)DB_SYSTEM_MARIADB << 40) | (error << 8) | (ev->operation & 0xFF);
}

static __always_inline struct object_key object_of(u64 addr)
{
    struct object_key key = {};
    key.addr = addr;
    key.tgid = bpf_get_current_pid_tgid() >> 32;
    return key;
}

/* A fresh record in this CPU's scratch slot, for the current thread. */
static __always_inline struct mysql_event *new_event(u32 tid, u32 flags)
{
    int zero = 0;
    struct mysql_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->start_ns = bpf_ktime_get_ns();
    ev->end_ns = 0;
    ev->connection_id = 0;
    ev->stmt = 0;
    ev->pid = bpf_get_current_pid_tgid() >> 32;
    ev->tid = tid;
    ev->error_code = 0;
    ev->flags = flags | (DB_SYSTEM_MARIADB ? FLAG_MARIADB : 0);
    ev->query_len = 0;
    ev->copied = 0;
    ev->tail_len = 0;
    ev->operation = 0;
    ev->db[0] = 0;
    /* sql_operation() reads the first 16 bytes: a shorter text must not borrow the
     * rest of its keyword from the previous record in this slot. */
    __builtin_memset(ev->query, 0, 16);
    return ev;
}

static __always_inline void start_query(u32 tid, struct mysql_event *ev)
{
    if (inflight.lookup(&tid))
        stat_inc(STAT_UNMATCHED); /* the previous statement on this thread never finished */
    inflight.update(&tid, ev);
}

/* Copy `length` bytes of text at `src`: its head into `head`, and when it is longer,
 * its last TAIL_MAX bytes into `tail` (sqlcommenter appends its comment). */
static __always_inline void copy_text(char *head, u32 *copied, char *tail, u32 *tail_len, u64 src, u64 length)
{
    u32 n = clamp_len(length, QUERY_MAX); /* longer text is cut: the sanitizer copes */
    if (bpf_probe_read_user(head, n, (void *)src) == 0)
        *copied = n;
    if (length > QUERY_MAX && bpf_probe_read_user(tail, TAIL_MAX, (void *)(src + length - TAIL_MAX)) == 0)
        *tail_len = TAIL_MAX;
}

/* The text copied only once the span is kept: a COM_STMT_EXECUTE's prepared statement
 * (kept per statement object), or on the USDT path the query at its address (the server
 * keeps thd->query() until the command ends). Once per record. */
static __always_inline void copy_deferred_text(struct mysql_event *ev)
{
    if (!ev->stmt || (ev->flags & FLAG_TEXT_READY))
        return;
    ev->flags |= FLAG_TEXT_READY;
    if (ev->flags & FLAG_USDT) {
        int len = bpf_probe_read_user_str(ev->query, QUERY_MAX, (void *)ev->stmt);
        ev->copied = len > 1 ? (u32)(len - 1) : 0; /* without the NUL */
        ev->query_len = ev->copied;
        return;
    }
    struct object_key key = object_of(ev->stmt);
    struct stmt_text *st = stmts.lookup(&key);
    if (!st)
        return; /* prepared before the agent attached, or evicted */
    ev->query_len = st->len;
    ev->copied = st->copied;
    ev->tail_len = st->tail_len;
    bpf_probe_read_kernel(ev->query, QUERY_MAX, st->text);
    bpf_probe_read_kernel(ev->tail, TAIL_MAX, st->tail);
}

/* Whether the statement's text ends with a sqlcommenter comment of a sampled parent. */
static __always_inline int sampled_parent(struct mysql_event *ev)
{
    copy_deferred_text(ev);
    if (ev->tail_len)
        return sampled_traceparent_suffix(ev->tail + TAIL_MAX - TP_SUFFIX);
    u32 copied = ev->copied;
    if (copied < TP_SUFFIX || copied > QUERY_MAX)
        return 0;
    char suffix[TP_SUFFIX];
    if (bpf_probe_read_kernel(suffix, TP_SUFFIX, ev->query + ((copied - TP_SUFFIX) & (QUERY_MAX - 1))) != 0)
        return 0;
    return sampled_traceparent_suffix(suffix);
}

/* Histogram for every finished statement; the record only when sampling keeps it. */
static __always_inline void finish_query(u32 tid, struct mysql_event *ev, int failed)
{
    ev->end_ns = bpf_ktime_get_ns();
    if (failed)
        ev->flags |= FLAG_FAILED;
    else
        ev->error_code = 0; /* an error a handler swallowed */
    u64 duration = ev->end_ns - ev->start_ns;
    hist_record(hist_dim(ev, failed), duration);
    int keep = sample_keep(ev->end_ns, duration, failed);
    if (!keep && parents_recently(ev->end_ns) && sampled_parent(ev))
        keep = keep_for_parent(ev->end_ns);
    if (keep) {
        copy_deferred_text(ev);
        u32 size = offsetof(struct mysql_event, query) + (ev->copied & (QUERY_MAX - 1));
        if (ev->copied >= QUERY_MAX)
            size = offsetof(struct mysql_event, tail) + (ev->tail_len ? TAIL_MAX : 0);
        emit_record(ev, size);
    }
    inflight.delete(&tid);
}

static __always_inline void copy_current_db(struct mysql_event *ev, u64 thd)
{
    struct object_key key = object_of(thd);
    struct db_name *db = thd_db.lookup(&key);
    if (db)
        __builtin_memcpy(ev->db, db->name, DB_MAX);
}

/* Remember a connection's database from a (pointer, length) pair in user memory. */
static __always_inline void set_db_name(u64 thd, u64 str, u64 length)
{
    struct object_key key = object_of(thd);
    if (!str || !length) {
        thd_db.delete(&key);
        return;
    }
    struct db_name db = {};
    u32 n = clamp_len(length, DB_MAX - 1);
    if (bpf_probe_read_user(db.name, n & (DB_MAX - 1), (void *)str) != 0)
        return;
    thd_db.update(&key, &db);
}

/* ---- uprobe path: dispatch_command ----------------------------------------- */

int on_dispatch_enter(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 command;
    u64 thd, packet = 0, length = 0;
#if DISPATCH_LAYOUT == LAYOUT_COM_DATA
    thd = PT_REGS_PARM1(ctx);
    command = (u32)PT_REGS_PARM3(ctx);
    if (command == COM_QUERY || command == COM_INIT_DB || command == COM_STMT_PREPARE) {
        u64 com_data = PT_REGS_PARM2(ctx);
        u32 len32 = 0;
        bpf_probe_read_user(&packet, sizeof(packet), (void *)com_data);
        bpf_probe_read_user(&len32, sizeof(len32), (void *)(com_data + 8));
        length = len32;
    }
#else
    command = (u32)PT_REGS_PARM1(ctx);
    thd = PT_REGS_PARM2(ctx);
    packet = PT_REGS_PARM3(ctx);
    length = (u32)PT_REGS_PARM4(ctx);
#endif
#if TRACK_INIT_DB
    if (command == COM_INIT_DB) {
        set_db_name(thd, packet, length);
        return 0;
    }
    if (command == COM_QUIT) {
        struct object_key key = object_of(thd);
        thd_db.delete(&key);
        return 0;
    }
#endif
    int with_text = command == COM_STMT_PREPARE || (DISPATCH_QUERY && command == COM_QUERY);
    if (!with_text && command != COM_STMT_EXECUTE && command != COM_STMT_BULK_EXECUTE)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = new_event(tid, command == COM_STMT_PREPARE ? FLAG_PREPARE
                                            : with_text ? 0 : FLAG_PREPARED);
    if (!ev)
        return 0;
    if (with_text) {
        copy_text(ev->query, &ev->copied, ev->tail, &ev->tail_len, packet, length);
        ev->query_len = (u32)length;
        ev->operation = sql_operation(ev->query);
    }
    copy_current_db(ev, thd);
    start_query(tid, ev);
    return 0;
}

int on_dispatch_return(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (!ev || (ev->flags & FLAG_USDT))
        return 0; /* not a traced command: pings, COM_INIT_DB, quit; or USDT's own */
    if ((ev->flags & FLAG_PREPARE) && ev->error_code == 0) {
        inflight.delete(&tid); /* a prepared statement, ready: no span */
        return 0;
    }
    finish_query(tid, ev, ev->error_code != 0);
    return 0;
}

/* Prepared_statement::prepare(this, const char *packet, uint packet_len). */
int on_stmt_prepare(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    int zero = 0;
    struct stmt_text *st = stmt_scratch.lookup(&zero);
    if (!st)
        return 0;
    struct object_key stmt = object_of(PT_REGS_PARM1(ctx));
    u64 text = STMT_TEXT_ARG;
    u64 length = (u32)STMT_LENGTH_ARG;
    st->copied = 0;
    st->tail_len = 0;
    st->len = (u32)length;
    __builtin_memset(st->text, 0, 16);
    copy_text(st->text, &st->copied, st->tail, &st->tail_len, text, length);
    st->operation = sql_operation(st->text);
    stmts.update(&stmt, st);
    return 0;
}

/* Prepared_statement::execute_loop / execute_bulk_loop(this, ...): which statement a
 * COM_STMT_EXECUTE runs (a SQL-level EXECUTE inside a COM_QUERY keeps its own text). */
int on_stmt_execute(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (!ev || !(ev->flags & FLAG_PREPARED) || ev->stmt)
        return 0;
    ev->stmt = PT_REGS_PARM1(ctx);
    struct object_key key = object_of(ev->stmt);
    struct stmt_text *st = stmts.lookup(&key);
    if (st)
        ev->operation = st->operation;
    return 0;
}

/* ---- USDT path ------------------------------------------------------------ */

int on_usdt_query_start(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = new_event(tid, FLAG_USDT);
    if (!ev)
        return 0;
    /* The operation (for the histogram) from the head; the text itself at the end, kept spans only. */
    ev->stmt = ARG_QUERY;
    bpf_probe_read_user(ev->query, 16, (void *)ev->stmt);
    ev->operation = sql_operation(ev->query);
    ev->connection_id = ARG_CONNID;
    if (bpf_probe_read_user_str(ev->db, DB_MAX, (void *)(ARG_DB)) < 0)
        ev->db[0] = 0;
    start_query(tid, ev);
    return 0;
}

int on_usdt_query_done(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (!ev || !(ev->flags & FLAG_USDT)) {
        stat_inc(STAT_UNMATCHED);
        return 0;
    }
    int status = (int)ARG_STATUS;
    finish_query(tid, ev, status != 0);
    return 0;
}

/* ---- errors and the current database (both paths) --------------------------- */

/* Protocol::net_send_error_packet(this, THD *thd, uint sql_errno, ...): the client gets an error. */
int on_error_sent(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (ev)
        ev->error_code = (u32)PT_REGS_PARM3(ctx);
    return 0;
}

/* my_message_sql(uint error, const char *str, myf flags): an error is raised. */
int on_error_raised(struct pt_regs *ctx)
{
    if (PT_REGS_PARM3(ctx) & ERROR_IGNORE_FLAGS)
        return 0; /* a note or a warning */
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (ev)
        ev->error_code = (u32)PT_REGS_PARM1(ctx);
    return 0;
}

/* THD::set_db / THD::reset_db (THD *this, const LEX_CSTRING *new_db). */
int on_set_db(struct pt_regs *ctx)
{
    struct lex_cstring db = {};
    u64 thd = PT_REGS_PARM1(ctx);
    u64 arg = PT_REGS_PARM2(ctx);
    if (arg && bpf_probe_read_user(&db, sizeof(db), (void *)arg) != 0)
        return 0;
    set_db_name(thd, db.str, db.length);
    return 0;
}
