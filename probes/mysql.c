/* MySQL and MariaDB: one record per finished query, by one of two ways in.
 *
 * USDT (builds with DTrace): query__start(query, connid, db, user, host) and
 * query__done(status) are paired by thread (query__done has no connection id).
 * The server fires them per statement; status = thd->is_error().
 *
 * Uprobes (MariaDB from distributions, MySQL 8): dispatch_command entry and
 * return, paired by thread. The packet buffer is reused by the next command, so
 * the entry copies the query text; only COM_QUERY is traced (one record per
 * packet, also for a multi-statement packet).
 *
 * Errors: on_error_sent (the error packet the client gets) or on_error_raised
 * (my_message_sql) store the server's error number in the thread's query.
 * On the uprobe path a stored number means failed; on the USDT path
 * query__done's status decides and the number only names the error.
 *
 * The connection's default database: THD::set_db / THD::reset_db keep it per
 * THD (the connection object: a thread pool runs one connection on many threads).
 *
 * Every finished query feeds `hist`/`hist_sum` (dim below), then sample_keep()
 * decides whether its record goes to the ring buffer (probes/common.h).
 *
 * -D cflags (from otel_ebpf/targets/mysql.py):
 *   QUERY_MAX             power of two, bytes of query text copied
 *   DB_SYSTEM_MARIADB     1 for MariaDB, 0 for MySQL (goes into records and dim)
 *   DISPATCH_LAYOUT       1: (command, thd, packet, length)  2: (thd, COM_DATA *, command)
 *   TRACK_INIT_DB         1: take the database from COM_INIT_DB (no THD::set_db probes)
 *   ERROR_IGNORE_FLAGS    my_message_sql flags that mean "not an error" (MariaDB notes, warnings)
 *   ARG_QUERY, ARG_CONNID, ARG_DB, ARG_STATUS   USDT argument expressions
 */
#include "common.h"

#ifndef QUERY_MAX
#define QUERY_MAX 1024
#endif
#ifndef DB_SYSTEM_MARIADB
#define DB_SYSTEM_MARIADB 1
#endif
#ifndef DISPATCH_LAYOUT
#define DISPATCH_LAYOUT 1
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

#define LAYOUT_COMMAND_FIRST 1
#define LAYOUT_COM_DATA 2

#define COM_QUIT 1
#define COM_INIT_DB 2
#define COM_QUERY 3

/* Record flags (mirrored in otel_ebpf/targets/mysql.py). */
#define FLAG_MARIADB 1
#define FLAG_USDT 2
#define FLAG_FAILED 4

#define DB_MAX 64
/* error number in dim for a failure whose number is unknown */
#define ERROR_UNKNOWN 0xFFFFFF

struct mysql_event {
    u64 start_ns;
    u64 end_ns;
    u64 connection_id; /* USDT only */
    u32 pid;           /* tgid: the server process */
    u32 tid;
    u32 error_code;    /* server error number (1064, 1062, ...), 0 if none seen */
    u32 flags;
    u32 query_len;     /* bytes of query text the server had (uprobe path) */
    u32 copied;        /* bytes in query[] */
    char db[DB_MAX];
    char query[QUERY_MAX];
};

struct db_name {
    char name[DB_MAX];
};

/* struct st_mysql_const_lex_string (LEX_CSTRING) */
struct lex_cstring {
    u64 str;
    u64 length;
};

BPF_TABLE("lru_hash", u32, struct mysql_event, inflight, INFLIGHT_MAX);
BPF_TABLE("lru_hash", u64, struct db_name, thd_db, INFLIGHT_MAX);
BPF_PERCPU_ARRAY(scratch, struct mysql_event, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);
BPF_ARRAY(sampling, u32, 1);
BPF_ARRAY(span_budget, u64, 1);

/* When the next span is due under the span budget (see within_budget() in common.h). */
static __always_inline u64 *span_budget_due(void)
{
    int zero = 0;
    return span_budget.lookup(&zero);
}

/* The sampling ratio in force (per mille): the agent lowers it above its span rate
 * limit; 0 in the map means "not set yet": the configured SAMPLE_PERMILLE. */
static __always_inline u32 sampling_permille(void)
{
    int zero = 0;
    u32 *value = sampling.lookup(&zero);
    return value && *value ? *value - 1 : SAMPLE_PERMILLE;
}
BPF_HASH(hist, struct hist_key, u64, HIST_MAX);
BPF_HASH(hist_sum, u64, u64, HIST_MAX);

static __always_inline void stat_inc(int index)
{
    u64 *value = stats.lookup(&index);
    if (value)
        (*value)++;
}

/* dim: bit 40 MariaDB, bits 8..31 error number (0 = success), bits 0..7 operation. */
static __always_inline u64 hist_dim(struct mysql_event *ev, int failed)
{
    u64 error = 0;
    if (failed)
        error = ev->error_code ? (ev->error_code & ERROR_UNKNOWN) : ERROR_UNKNOWN;
    return ((u64)DB_SYSTEM_MARIADB << 40) | (error << 8) | (sql_operation(ev->query) & 0xFF);
}

static __always_inline void hist_record(u64 dim, u64 duration_ns)
{
    u64 zero = 0;
    struct hist_key key = {};
    key.dim = dim;
    key.bucket = duration_bucket(duration_ns);
    u64 *count = hist.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    u64 *sum = hist_sum.lookup_or_try_init(&dim, &zero);
    if (sum)
        __sync_fetch_and_add(sum, duration_ns);
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
    ev->pid = bpf_get_current_pid_tgid() >> 32;
    ev->tid = tid;
    ev->error_code = 0;
    ev->flags = flags | (DB_SYSTEM_MARIADB ? FLAG_MARIADB : 0);
    ev->query_len = 0;
    ev->copied = 0;
    ev->db[0] = 0;
    return ev;
}

static __always_inline void start_query(u32 tid, struct mysql_event *ev)
{
    if (inflight.lookup(&tid))
        stat_inc(STAT_UNMATCHED); /* the previous query on this thread never finished */
    inflight.update(&tid, ev);
}

/* Histogram for every finished query; the record only when sampling keeps it. */
static __always_inline void finish_query(u32 tid, struct mysql_event *ev, int failed)
{
    ev->end_ns = bpf_ktime_get_ns();
    if (failed)
        ev->flags |= FLAG_FAILED;
    else
        ev->error_code = 0; /* an error a handler swallowed */
    u64 duration = ev->end_ns - ev->start_ns;
    hist_record(hist_dim(ev, failed), duration);
    stat_inc(STAT_OPERATIONS);
    if (sample_keep(ev->end_ns, duration, failed, sampling_permille(), span_budget_due())) {
        u32 copied = ev->copied;
        u32 size = offsetof(struct mysql_event, query) + (copied & (QUERY_MAX - 1));
        if (copied >= QUERY_MAX)
            size = sizeof(struct mysql_event);
        stat_inc(events.ringbuf_output(ev, size, 0) == 0 ? STAT_EVENTS : STAT_LOST);
    } else {
        stat_inc(STAT_SAMPLED_OUT);
    }
    inflight.delete(&tid);
}

static __always_inline void copy_current_db(struct mysql_event *ev, u64 thd)
{
    struct db_name *db = thd_db.lookup(&thd);
    if (db)
        __builtin_memcpy(ev->db, db->name, DB_MAX);
}

/* Remember a connection's database from a (pointer, length) pair in user memory. */
static __always_inline void set_db_name(u64 thd, u64 str, u64 length)
{
    if (!str || !length) {
        thd_db.delete(&thd);
        return;
    }
    struct db_name db = {};
    u32 n = clamp_len(length, DB_MAX - 1);
    if (bpf_probe_read_user(db.name, n & (DB_MAX - 1), (void *)str) != 0)
        return;
    thd_db.update(&thd, &db);
}

/* ---- uprobe path: dispatch_command ----------------------------------------- */

int on_dispatch_enter(struct pt_regs *ctx)
{
    u32 command;
    u64 thd, packet = 0, length = 0;
#if DISPATCH_LAYOUT == LAYOUT_COM_DATA
    thd = PT_REGS_PARM1(ctx);
    command = (u32)PT_REGS_PARM3(ctx);
    if (command == COM_QUERY || command == COM_INIT_DB) {
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
        thd_db.delete(&thd);
        return 0;
    }
#endif
    if (command != COM_QUERY)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = new_event(tid, 0);
    if (!ev)
        return 0;
    /* The scratch slot holds the previous query's bytes, and sql_operation() reads the first
     * 16: a shorter query must not borrow the rest of its keyword from them. */
    __builtin_memset(ev->query, 0, 16);
    u32 n = clamp_len(length, QUERY_MAX); /* longer text is cut: the sanitizer copes */
    if (bpf_probe_read_user(ev->query, n, (void *)packet) == 0)
        ev->copied = n;
    ev->query_len = (u32)length;
    copy_current_db(ev, thd);
    start_query(tid, ev);
    return 0;
}

int on_dispatch_return(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (!ev)
        return 0; /* not a COM_QUERY: pings, prepares, COM_INIT_DB, quit */
    finish_query(tid, ev, ev->error_code != 0);
    return 0;
}

/* ---- USDT path ------------------------------------------------------------ */

int on_usdt_query_start(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = new_event(tid, FLAG_USDT);
    if (!ev)
        return 0;
    int len = bpf_probe_read_user_str(ev->query, QUERY_MAX, (void *)(ARG_QUERY));
    ev->copied = len > 1 ? (u32)(len - 1) : 0; /* without the NUL */
    ev->query_len = ev->copied;
    ev->connection_id = ARG_CONNID;
    if (bpf_probe_read_user_str(ev->db, DB_MAX, (void *)(ARG_DB)) < 0)
        ev->db[0] = 0;
    start_query(tid, ev);
    return 0;
}

int on_usdt_query_done(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct mysql_event *ev = inflight.lookup(&tid);
    if (!ev) {
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
