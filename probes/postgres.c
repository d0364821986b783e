/* PostgreSQL: one record per finished query, from the server's own USDT probes.
 *
 * query__start(query) and query__done(query) are paired by thread (a backend is
 * one process with one thread). A failing query never fires query__done: errcode()
 * (an exported function every ereport calls with the SQLSTATE) remembers the code,
 * and transaction__abort closes the query there.
 *
 * -D cflags (from otel_ebpf/targets/postgres.py):
 *   QUERY_MAX                power of two, bytes of query text copied
 *   ARG_QUERY_START, ARG_QUERY_DONE   C expressions reading the probes' first argument
 *   LOAD_BASE_QUERY_DONE, LOAD_BASE_ABORT  expressions giving the binary's load base
 *   SYM_MY_PROC_PORT, SYM_POSTMASTER_PID   link-time addresses of those globals
 *   PORT_OFFSETS (0/1), PORT_LADDR, PORT_RADDR, PORT_DATABASE_NAME   struct Port layout
 */
#include "common.h"

#ifndef QUERY_MAX
#define QUERY_MAX 1024
#endif

#define KIND_DONE 1
#define KIND_ABORT 2 /* failed with the SQLSTATE errcode() saw */
#define KIND_ABORT_NO_CODE 3 /* aborted with no errcode(): a ROLLBACK, or an elog(ERROR) */

struct inflight {
    u64 start_ns;
    u64 query_ptr;
    u64 abort_ns;
    u32 sqlstate;
    u32 aborted;
    u32 operation; /* sql_operation() of the query, for the histogram */
    u32 pad;
};

struct pg_event {
    u64 start_ns;
    u64 end_ns;
    u32 pid;
    u32 postmaster_pid;
    u32 kind;
    u32 sqlstate;
    u8 raddr[28]; /* struct sockaddr (in, in6 or un prefix) of the client */
    u8 laddr[64]; /* the server's side: its port, or the unix socket path */
    char database[64];
    u32 query_len;
    u32 pad;
    char query[QUERY_MAX];
};

BPF_TABLE("lru_hash", u32, struct inflight, inflight, INFLIGHT_MAX);
BPF_PERCPU_ARRAY(scratch, struct pg_event, 1);
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

/* dim: statement kind in bits 0-7, failed in bit 8, SQLSTATE (MAKE_SQLSTATE) from bit 9. */
static __always_inline void hist_record(u32 operation, u32 failed, u32 sqlstate, u64 duration_ns)
{
    struct hist_key key = {};
    key.dim = (u64)operation | ((u64)(failed ? 1 : 0) << 8) | ((u64)(failed ? sqlstate : 0) << 9);
    key.bucket = duration_bucket(duration_ns);
    u64 zero = 0;
    u64 *count = hist.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    u64 *sum = hist_sum.lookup_or_try_init(&key.dim, &zero);
    if (sum)
        __sync_fetch_and_add(sum, duration_ns);
    stat_inc(STAT_OPERATIONS);
}

/* sql_operation() needs the text in BPF memory: read just its head. */
static __always_inline u32 operation_of(u64 query_ptr)
{
    char head[24] = {};
    bpf_probe_read_user(head, 16, (void *)query_ptr);
    return sql_operation(head);
}

int on_query_start(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight entry = {};
    struct inflight *previous = inflight.lookup(&tid);
    if (previous) {
        if (previous->aborted) /* aborted by an elog(ERROR) with no SQLSTATE: XX000 */
            hist_record(previous->operation, 1, 0xa28 /* MAKE_SQLSTATE XX000 */,
                        previous->abort_ns - previous->start_ns);
        else
            stat_inc(STAT_UNMATCHED); /* the previous query never finished or aborted */
    }
    entry.start_ns = bpf_ktime_get_ns();
    entry.query_ptr = ARG_QUERY_START;
    entry.operation = operation_of(entry.query_ptr);
    inflight.update(&tid, &entry);
    return 0;
}

/* errcode(int sqlerrcode): remember the code of the error being raised. */
int on_errcode(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (entry)
        entry->sqlstate = (u32)PT_REGS_PARM1(ctx);
    return 0;
}

/* Record the histogram (unless `kind` only marks an abort that a done may follow),
 * then send the query as a span record when sampling keeps it. */
static __always_inline int emit(struct pt_regs *ctx, struct inflight *entry, u32 tid,
                                u32 kind, u64 query_ptr, u64 load_base)
{
    u64 now = bpf_ktime_get_ns();
    u64 duration = now - entry->start_ns;
    int keep = 1;
    if (kind == KIND_DONE && !entry->aborted) {
        hist_record(entry->operation, 0, 0, duration);
        keep = sample_keep(now, duration, 0, sampling_permille(), span_budget_due());
    } else if (kind == KIND_DONE) {
        hist_record(entry->operation, 0, 0, duration); /* a ROLLBACK: its abort was no error */
    } else if (kind == KIND_ABORT) {
        hist_record(entry->operation, 1, entry->sqlstate, duration);
    }
    if (!keep) {
        stat_inc(STAT_SAMPLED_OUT);
        return 0;
    }
    int zero = 0;
    struct pg_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->start_ns = entry->start_ns;
    ev->end_ns = now;
    ev->pid = bpf_get_current_pid_tgid() >> 32;
    ev->kind = kind;
    ev->sqlstate = entry->sqlstate;
    ev->postmaster_pid = 0;
    bpf_probe_read_user(&ev->postmaster_pid, sizeof(u32), (void *)(load_base + SYM_POSTMASTER_PID));
    ev->database[0] = 0;
    ev->raddr[0] = 0;
    ev->raddr[1] = 0;
    ev->laddr[0] = 0;
    ev->laddr[1] = 0;
#if PORT_OFFSETS
    u64 port = 0;
    bpf_probe_read_user(&port, sizeof(port), (void *)(load_base + SYM_MY_PROC_PORT));
    if (port) {
        u64 dbname = 0;
        bpf_probe_read_user(ev->raddr, sizeof(ev->raddr), (void *)(port + PORT_RADDR));
        bpf_probe_read_user(ev->laddr, sizeof(ev->laddr), (void *)(port + PORT_LADDR));
        bpf_probe_read_user(&dbname, sizeof(dbname), (void *)(port + PORT_DATABASE_NAME));
        if (dbname)
            bpf_probe_read_user_str(ev->database, sizeof(ev->database), (void *)dbname);
    }
#endif
    int len = bpf_probe_read_user_str(ev->query, QUERY_MAX, (void *)query_ptr);
    u32 qlen = len > 0 ? (u32)len : 0;
    ev->query_len = qlen;
    u32 size = offsetof(struct pg_event, query) + (qlen & (QUERY_MAX - 1));
    if (qlen >= QUERY_MAX)
        size = sizeof(struct pg_event);
    stat_inc(events.ringbuf_output(ev, size, 0) == 0 ? STAT_EVENTS : STAT_LOST);
    return 0;
}

int on_query_done(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (!entry) {
        stat_inc(STAT_UNMATCHED);
        return 0;
    }
    emit(ctx, entry, tid, KIND_DONE, ARG_QUERY_DONE, LOAD_BASE_QUERY_DONE);
    inflight.delete(&tid);
    return 0;
}

int on_transaction_abort(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (!entry || entry->aborted)
        return 0; /* an abort outside a query (e.g. a backend exiting mid-transaction) */
    if (entry->sqlstate) {
        emit(ctx, entry, tid, KIND_ABORT, entry->query_ptr, LOAD_BASE_ABORT);
        inflight.delete(&tid);
    } else {
        /* A ROLLBACK statement aborts too and then fires query__done; user space
         * holds this record briefly and drops it if that done follows. */
        emit(ctx, entry, tid, KIND_ABORT_NO_CODE, entry->query_ptr, LOAD_BASE_ABORT);
        entry->aborted = 1;
        entry->abort_ns = bpf_ktime_get_ns();
    }
    return 0;
}
