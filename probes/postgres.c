/* PostgreSQL: one record per executed statement, from the server's own USDT probes.
 *
 * Simple protocol (a Query message): query__start(query) and query__done(query),
 * paired by thread (a backend is one process with one thread).
 *
 * Extended protocol (Parse/Bind/Execute): query__execute__start/done fire in PortalRun,
 * which exec_execute_message calls once per Execute message. PortalRun also runs inside
 * a simple query, and nested inside another PortalRun (SQL-level EXECUTE, a function
 * running SQL): only the outermost one outside a simple query starts a statement, and
 * only the done of that same frame (the same stack pointer at both sites) ends it, so a
 * nested level that longjmps out on an error cannot end it early. The text is the
 * global debug_query_string, which exec_execute_message points at the portal's source
 * text (with its $n placeholders; parameter values are never read).
 *
 * Telling a simple query's own portal from an Execute that follows a simple query whose
 * entry was never closed (an error inside an already failed transaction block fires no
 * abort): the distance on the stack from query__start's frame to its portal's PortalRun
 * is a constant of the binary, learned from the first simple query that runs a portal
 * (`portal_gap`). A PortalRun that deep or deeper belongs to the simple query.
 *
 * Failures never fire a done: errstart(elevel) (every ereport and elog; errstart_cold is
 * the same for constant levels) marks an ERROR or worse as XX000, errcode() then gives
 * its SQLSTATE, and transaction__abort closes the statement there. errcode() of a
 * NOTICE or WARNING (CREATE TABLE IF NOT EXISTS, a ROLLBACK outside a transaction) is
 * no failure and is ignored. An error outside any statement (a Parse or Bind message
 * that fails: a syntax error, a missing table, a bad parameter value) opens an
 * error-only entry at errstart() with the text debug_query_string points at then
 * (exec_parse_message and exec_bind_message point it at the statement's text; the error
 * handler clears it before the abort); not in a process that serves no client (an
 * autovacuum worker cancelled by a lock). Messages the server skips after an error until
 * Sync run nothing and give no record. A ROLLBACK fires transaction__abort with no error
 * raised, then its done: it is an ordinary statement, sampled like any other.
 *
 * An error inside a transaction block that has already failed (25P02) fires no abort:
 * its entry is counted (histogram, STAT_UNMATCHED) when the backend starts its next
 * statement, as its text may be gone by then.
 *
 * -D cflags (from otel_ebpf/targets/postgres.py):
 *   QUERY_MAX, TAIL_MAX      powers of two, bytes of query text copied from its head / tail
 *   ARG_QUERY_START, ARG_QUERY_DONE   C expressions reading the probes' first argument
 *   LOAD_BASE_QUERY_DONE, LOAD_BASE_ABORT, LOAD_BASE_EXECUTE_START, LOAD_BASE_EXECUTE_DONE,
 *   LOAD_BASE_ERRSTART, LOAD_BASE_ERRSTART_COLD   expressions giving the binary's load base at those sites
 *   PG_ELEVEL_ERROR          the server's ERROR elevel (20 before PostgreSQL 14, then 21)
 *   HAVE_ERRSTART (0/1)      errstart() found: without it, aborts with no code are held in user space
 *   HAVE_ERRSTART_COLD (0/1) errstart_cold() is probed too (a build where it is not a jump to errstart)
 *   SYM_MY_PROC_PORT, SYM_POSTMASTER_PID, SYM_DEBUG_QUERY_STRING   link-time addresses
 *   PORT_OFFSETS (0/1), PORT_LADDR, PORT_RADDR, PORT_DATABASE_NAME   struct Port layout
 *   TAIL_CHUNKS              how many TAIL_MAX - 1 byte steps to look for a long query's end
 */
#include "common.h"
#include "postgres.h"

#ifndef TAIL_CHUNKS
#define TAIL_CHUNKS 32
#endif

#ifndef PG_ELEVEL_ERROR
#define PG_ELEVEL_ERROR 21
#endif
#ifndef HAVE_ERRSTART
#define HAVE_ERRSTART 0
#endif
#ifndef HAVE_ERRSTART_COLD
#define HAVE_ERRSTART_COLD 0
#endif
#define SQLSTATE_XX000 0xa28 /* MAKE_SQLSTATE('X','X','0','0','0'): an error with no code */

#define PHASE_SIMPLE 1
#define PHASE_EXTENDED 2
#define PHASE_ERROR 3 /* errcode() outside any statement: a failing Parse or Bind */

struct inflight {
    u64 start_ns;
    u64 query_ptr;
    u64 sp;        /* the stack pointer at query__start, or at the outermost execute__start */
    u64 abort_ns;
    u64 error_ns;  /* when an ERROR was raised (errstart) */
    u32 sqlstate;
    u32 phase;
    u32 aborted;
    u32 operation; /* sql_operation() of the text, for the histogram */
    u32 error_level; /* elevel of the last errstart() */
    u32 pad;
};

BPF_TABLE("lru_hash", u32, struct inflight, inflight, INFLIGHT_MAX);
BPF_PERCPU_ARRAY(scratch, struct pg_event, 1);
BPF_ARRAY(portal_gap, u64, 1); /* query__start's sp minus its own portal's PortalRun sp */

/* dim: statement kind in bits 0-7, failed in bit 8, SQLSTATE (MAKE_SQLSTATE) from bit 9. */
static __always_inline u64 hist_dim(u32 operation, u32 failed, u32 sqlstate)
{
    return (u64)operation | ((u64)(failed ? 1 : 0) << 8) | ((u64)(failed ? sqlstate : 0) << 9);
}

/* sql_operation() needs the text in BPF memory: read just its head. */
static __always_inline u32 operation_of(u64 query_ptr)
{
    char head[24] = {};
    if (query_ptr)
        bpf_probe_read_user(head, 16, (void *)query_ptr);
    return sql_operation(head);
}

static __always_inline u64 debug_query_string(u64 load_base)
{
    u64 ptr = 0;
    bpf_probe_read_user(&ptr, sizeof(ptr), (void *)(load_base + SYM_DEBUG_QUERY_STRING));
    return ptr;
}

/* MyProcPort: the backend's client connection (0 when none, or no such symbol). */
static __always_inline u64 my_proc_port(u64 load_base)
{
    u64 port = 0;
    if (SYM_MY_PROC_PORT != 0)
        bpf_probe_read_user(&port, sizeof(port), (void *)(load_base + SYM_MY_PROC_PORT));
    return port;
}

/* Whether this backend serves a client connection (MyProcPort is set): not autovacuum,
 * a background worker or another auxiliary process. Unknown (no symbol): assumed so. */
static __always_inline int serves_a_client(u64 load_base)
{
    return SYM_MY_PROC_PORT == 0 || my_proc_port(load_base) != 0;
}

/* A statement whose entry was never closed (its thread ran a new one): an error raised
 * with no abort to follow (inside a transaction block that had already failed) or a
 * lost probe hit. Counted, never exported with a text that may be gone. */
static __always_inline void replace_stale(struct inflight *previous)
{
    if (previous->aborted) { /* aborted by an elog(ERROR) with no SQLSTATE: XX000 */
        hist_record(hist_dim(previous->operation, 1, SQLSTATE_XX000), previous->abort_ns - previous->start_ns);
    } else if (previous->error_ns) { /* an error with no abort: in a failed transaction block */
        hist_record(hist_dim(previous->operation, 1, previous->sqlstate), previous->error_ns - previous->start_ns);
        stat_inc(STAT_UNMATCHED);
    } else if (previous->phase != PHASE_ERROR) {
        stat_inc(STAT_UNMATCHED);
    }
}

int on_query_start(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *previous = inflight.lookup(&tid);
    if (previous)
        replace_stale(previous);
    struct inflight entry = {};
    entry.start_ns = bpf_ktime_get_ns();
    entry.query_ptr = ARG_QUERY_START;
    entry.sp = PT_REGS_SP(ctx);
    entry.phase = PHASE_SIMPLE;
    entry.operation = operation_of(entry.query_ptr);
    inflight.update(&tid, &entry);
    return 0;
}

/* Whether a PortalRun at `sp` runs inside the simple query `entry` (see portal_gap). */
static __always_inline int in_simple_query(struct inflight *entry, u64 sp)
{
    int zero = 0;
    u64 *learned = portal_gap.lookup(&zero);
    if (!learned)
        return 1;
    u64 gap = entry->sp - sp;
    if (*learned == 0) {
        if (entry->sqlstate || entry->aborted)
            return 0; /* a failed query with no abort: not a live one to learn from */
        *learned = gap;
        return 1;
    }
    return gap >= *learned;
}

int on_execute_start(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *previous = inflight.lookup(&tid);
    u64 sp = PT_REGS_SP(ctx);
    if (previous) {
        if (previous->phase == PHASE_SIMPLE && in_simple_query(previous, sp))
            return 0; /* a portal of a simple query: that query is the span */
        if (previous->phase == PHASE_EXTENDED && sp < previous->sp)
            return 0; /* nested inside the Execute being traced (deeper on the stack) */
        replace_stale(previous);
    }
    struct inflight entry = {};
    entry.start_ns = bpf_ktime_get_ns();
    entry.query_ptr = debug_query_string(LOAD_BASE_EXECUTE_START);
    entry.sp = sp;
    entry.phase = PHASE_EXTENDED;
    entry.operation = operation_of(entry.query_ptr);
    inflight.update(&tid, &entry);
    return 0;
}

/* errstart(int elevel, ...): an ERROR or worse fails the statement (XX000 until
 * errcode() says more); a lower level only tells errcode() to ignore its code. */
static __always_inline int raise_level(struct pt_regs *ctx, u64 load_base)
{
    if (!pid_selected())
        return 0;
    u32 level = (u32)PT_REGS_PARM1(ctx);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (level < PG_ELEVEL_ERROR) {
        if (entry)
            entry->error_level = level;
        return 0;
    }
    if (entry) {
        if (entry->error_level < PG_ELEVEL_ERROR || !entry->error_ns) {
            entry->error_ns = bpf_ktime_get_ns();
            entry->sqlstate = SQLSTATE_XX000;
        }
        entry->error_level = level;
        return 0;
    }
    /* A background process (an autovacuum worker cancelled by a lock it was in the way
     * of: an everyday ERROR 57014) serves no client: no failed operation to report. */
    if (!serves_a_client(load_base))
        return 0;
    /* A Parse or Bind message failing: its text is what debug_query_string points at now
     * (the server clears it before the abort, but the text lives until the next message). */
    struct inflight fresh = {};
    fresh.start_ns = bpf_ktime_get_ns();
    fresh.error_ns = fresh.start_ns;
    fresh.sqlstate = SQLSTATE_XX000;
    fresh.error_level = level;
    fresh.phase = PHASE_ERROR;
    fresh.query_ptr = debug_query_string(load_base); /* its operation: at the abort (one copy of that code) */
    inflight.update(&tid, &fresh);
    return 0;
}

int on_errstart(struct pt_regs *ctx)
{
    return raise_level(ctx, LOAD_BASE_ERRSTART);
}

#if HAVE_ERRSTART_COLD /* only where errstart_cold is not just a jump to errstart */
int on_errstart_cold(struct pt_regs *ctx)
{
    return raise_level(ctx, LOAD_BASE_ERRSTART_COLD);
}
#endif

/* errcode(int sqlerrcode): the SQLSTATE of the error being raised (not of a notice). */
int on_errcode(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (entry && (!HAVE_ERRSTART || entry->error_level >= PG_ELEVEL_ERROR))
        entry->sqlstate = (u32)PT_REGS_PARM1(ctx);
    return 0;
}

/* The last TAIL_MAX bytes of a string whose end lies at or after `at`: the end is found in
 * steps of TAIL_MAX - 1 bytes (bpf_probe_read_user_str stops at the NUL), up to
 * TAIL_CHUNKS steps. Returns the bytes copied into `tail` (0: too long). */
static __always_inline u32 read_tail(char *tail, u64 at)
{
    /* A bounded loop the verifier walks (kernel >= 5.3): unrolled, it would double the compile time. */
#pragma clang loop unroll(disable)
    for (int i = 0; i < TAIL_CHUNKS; i++) {
        long n = bpf_probe_read_user_str(tail, TAIL_MAX, (void *)at);
        if (n <= 0)
            return 0;
        if (n < TAIL_MAX) {
            u64 end = at + n - 1; /* the NUL */
            if (bpf_probe_read_user(tail, TAIL_MAX, (void *)(end - TAIL_MAX)) != 0)
                return 0;
            return TAIL_MAX;
        }
        at += TAIL_MAX - 1;
    }
    return 0;
}

/* Whether the statement's text ends with a sqlcommenter comment of a sampled parent
 * (see keep_for_parent in common.h); uses the scratch record's tail as room. */
static __always_inline int sampled_parent(u64 query_ptr)
{
    int zero = 0;
    struct pg_event *ev = scratch.lookup(&zero);
    if (!ev || !query_ptr)
        return 0;
    long n = bpf_probe_read_user_str(ev->tail, TAIL_MAX, (void *)query_ptr);
    if (n <= TP_SUFFIX)
        return 0;
    if (n < TAIL_MAX) {
        char suffix[TP_SUFFIX];
        if (bpf_probe_read_user(suffix, TP_SUFFIX, (void *)(query_ptr + n - 1 - TP_SUFFIX)) != 0)
            return 0;
        return sampled_traceparent_suffix(suffix);
    }
    return read_tail(ev->tail, query_ptr + TAIL_MAX - 1) &&
           sampled_traceparent_suffix(ev->tail + TAIL_MAX - TP_SUFFIX);
}

/* Record the histogram (unless `kind` only marks an abort that a done may follow),
 * then send the statement as a span record when sampling keeps it. */
static __always_inline int emit(struct pt_regs *ctx, struct inflight *entry, u32 kind, u64 query_ptr,
                                u64 load_base, u32 protocol)
{
    u64 now = bpf_ktime_get_ns();
    u64 duration = now - entry->start_ns;
    int keep = 1; /* failures are always kept */
    if (kind == KIND_DONE && (HAVE_ERRSTART || !entry->aborted)) {
        hist_record(hist_dim(entry->operation, 0, 0), duration);
        keep = sample_keep(now, duration, 0);
        if (!keep && parents_recently(now) && sampled_parent(query_ptr))
            keep = keep_for_parent(now);
    } else if (kind == KIND_DONE) {
        hist_record(hist_dim(entry->operation, 0, 0), duration); /* a ROLLBACK: its abort was held */
    } else if (kind == KIND_ABORT) {
        hist_record(hist_dim(entry->operation, 1, entry->sqlstate), duration);
    }
    if (!keep)
        return 0;
    int zero = 0;
    struct pg_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->start_ns = entry->start_ns;
    ev->end_ns = now;
    ev->pid = bpf_get_current_pid_tgid() >> 32;
    ev->kind = kind;
    ev->sqlstate = entry->sqlstate;
    ev->protocol = protocol;
    ev->flags = 0;
    ev->postmaster_pid = 0;
    bpf_probe_read_user(&ev->postmaster_pid, sizeof(u32), (void *)(load_base + SYM_POSTMASTER_PID));
    ev->database[0] = 0;
    ev->raddr[0] = 0;
    ev->raddr[1] = 0;
    ev->laddr[0] = 0;
    ev->laddr[1] = 0;
#if PORT_OFFSETS
    u64 port = my_proc_port(load_base);
    if (port) {
        u64 dbname = 0;
        bpf_probe_read_user(ev->raddr, sizeof(ev->raddr), (void *)(port + PORT_RADDR));
        bpf_probe_read_user(ev->laddr, sizeof(ev->laddr), (void *)(port + PORT_LADDR));
        bpf_probe_read_user(&dbname, sizeof(dbname), (void *)(port + PORT_DATABASE_NAME));
        if (dbname)
            bpf_probe_read_user_str(ev->database, sizeof(ev->database), (void *)dbname);
    }
#endif
    long len = query_ptr ? bpf_probe_read_user_str(ev->query, QUERY_MAX, (void *)query_ptr) : 0;
    u32 qlen = len > 1 ? (u32)(len - 1) : 0; /* without the NUL */
    ev->query_len = qlen;
    ev->tail_len = 0;
    u32 size = offsetof(struct pg_event, query) + (qlen & (QUERY_MAX - 1));
    if (qlen >= QUERY_MAX - 1) {
        ev->tail_len = read_tail(ev->tail, query_ptr + QUERY_MAX - 1);
        size = offsetof(struct pg_event, tail) + (ev->tail_len ? TAIL_MAX : 0);
    }
    emit_record(ev, size);
    return 0;
}

int on_query_done(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (!entry || entry->phase != PHASE_SIMPLE) {
        stat_inc(STAT_UNMATCHED);
        return 0;
    }
    emit(ctx, entry, KIND_DONE, ARG_QUERY_DONE, LOAD_BASE_QUERY_DONE, PROTOCOL_SIMPLE);
    inflight.delete(&tid);
    return 0;
}

int on_execute_done(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (!entry || entry->phase != PHASE_EXTENDED || entry->sp != PT_REGS_SP(ctx))
        return 0; /* inside a simple query, or a nested PortalRun */
    emit(ctx, entry, KIND_DONE, entry->query_ptr, LOAD_BASE_EXECUTE_DONE, PROTOCOL_EXTENDED);
    inflight.delete(&tid);
    return 0;
}

int on_transaction_abort(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *entry = inflight.lookup(&tid);
    if (!entry || entry->aborted)
        return 0; /* an abort outside a statement (e.g. a backend exiting mid-transaction) */
    /* A failed Parse or Bind message (its text was taken at errstart()), a failed
     * statement, or one aborting with no error raised: a ROLLBACK, which then fires its
     * done (without errstart() to tell them apart, user space holds that record briefly
     * and drops it if the done follows). One emit() call: every call is inlined, and each
     * copy costs compile time. */
    u32 protocol = entry->phase == PHASE_SIMPLE ? PROTOCOL_SIMPLE
                 : entry->phase == PHASE_EXTENDED ? PROTOCOL_EXTENDED : PROTOCOL_MESSAGE;
    if (entry->phase == PHASE_ERROR)
        entry->operation = operation_of(entry->query_ptr);
    u32 kind = entry->error_ns || entry->phase == PHASE_ERROR || (!HAVE_ERRSTART && entry->sqlstate)
             ? KIND_ABORT : KIND_ABORT_NO_CODE;
    if (kind == KIND_ABORT || !HAVE_ERRSTART)
        emit(ctx, entry, kind, entry->query_ptr, LOAD_BASE_ABORT, protocol);
    if (kind == KIND_ABORT) {
        inflight.delete(&tid);
    } else {
        entry->aborted = 1;
        entry->abort_ns = bpf_ktime_get_ns();
    }
    return 0;
}
