/* OpenSSL (libssl.so.3 / 1.1): one record per SSL_read / SSL_write call that moved
 * data, with the first CAPTURE_MAX bytes of its plaintext. HTTP is parsed in user
 * space (otel_ebpf/http.py): a request and its response span many calls, in two
 * directions, so nothing is paired or measured here and there are no kernel
 * histograms for this target.
 *
 * Entry probes remember the call (SSL pointer, buffer, out-parameter) by thread;
 * the return probe reads how many bytes really moved (the read buffer is only
 * filled on return) and copies the prefix. SSL_read/SSL_write return that count;
 * SSL_read_ex/SSL_write_ex return 1 and leave it in a size_t out-parameter.
 *
 * Each record carries the stream offset of its first byte in its direction, kept
 * per (pid, SSL pointer): user space sees exactly how many bytes a lost record (full
 * ring buffer) took away and keeps the HTTP framing when they were body bytes.
 * SSL_free ends a connection that carried data (a "close" record), so a body that
 * runs until close can end and a reused SSL address starts a fresh stream.
 *
 * -D cflags (from otel_ebpf/targets/openssl.py):
 *   CAPTURE_MAX   power of two, plaintext bytes copied per call
 *   CONN_MAX      connections whose stream offsets are kept (LRU)
 */
#define NO_KERNEL_HISTOGRAMS 1 /* requests are framed in user space: no durations here */
#include "common.h"
#include "openssl.h"

#ifndef CONN_MAX
#define CONN_MAX 16384
#endif

struct call {
    u64 ssl;
    u64 buf;
    u64 len_ptr; /* size_t * of the _ex variants, 0 for SSL_read/SSL_write */
    u64 start_ns;
    u32 direction;
    u32 pad;
};

struct conn_key {
    u64 ssl;
    u32 pid;
    u32 pad;
};

struct conn_offsets {
    u64 read;
    u64 write;
};

BPF_TABLE("lru_hash", u32, struct call, inflight, INFLIGHT_MAX);
BPF_TABLE("lru_hash", struct conn_key, struct conn_offsets, conns, CONN_MAX);
BPF_PERCPU_ARRAY(scratch, struct tls_event, 1);

static __always_inline int enter(struct pt_regs *ctx, u32 direction, u64 len_ptr)
{
    if (!pid_selected())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct call call = {};
    if (inflight.lookup(&tid))
        stat_inc(STAT_UNMATCHED); /* the previous call of this thread never returned */
    call.ssl = PT_REGS_PARM1(ctx);
    call.buf = PT_REGS_PARM2(ctx);
    call.len_ptr = len_ptr;
    call.start_ns = bpf_ktime_get_ns();
    call.direction = direction;
    inflight.update(&tid, &call);
    return 0;
}

int on_read_entry(struct pt_regs *ctx) { return enter(ctx, DIR_READ, 0); }
int on_write_entry(struct pt_regs *ctx) { return enter(ctx, DIR_WRITE, 0); }
int on_read_ex_entry(struct pt_regs *ctx) { return enter(ctx, DIR_READ, PT_REGS_PARM4(ctx)); }
int on_write_ex_entry(struct pt_regs *ctx) { return enter(ctx, DIR_WRITE, PT_REGS_PARM4(ctx)); }

/* Bytes the call moved: 0 when it failed or would block (nginx's reads often do). */
static __always_inline u64 moved_bytes(struct pt_regs *ctx, struct call *call)
{
    int ret = (int)PT_REGS_RC(ctx);
    if (!call->len_ptr)
        return ret > 0 ? (u64)ret : 0;
    u64 moved = 0;
    if (ret != 1 || bpf_probe_read_user(&moved, sizeof(moved), (void *)call->len_ptr) != 0)
        return 0;
    return moved;
}

/* The stream offset of this call's first byte; advances the connection's offset. */
static __always_inline u64 take_offset(struct conn_key *key, u32 direction, u64 len)
{
    struct conn_offsets *offsets = conns.lookup(key);
    if (!offsets) {
        struct conn_offsets fresh = {};
        conns.update(key, &fresh);
        offsets = conns.lookup(key);
        if (!offsets)
            return 0;
    }
    u64 offset;
    if (direction == DIR_WRITE) {
        offset = offsets->write;
        offsets->write = offset + len;
    } else {
        offset = offsets->read;
        offsets->read = offset + len;
    }
    return offset;
}

int on_return(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct call *found = inflight.lookup(&tid);
    if (!found) {
        stat_inc(STAT_UNMATCHED); /* attached while this call was in progress */
        return 0;
    }
    struct call call = *found;
    inflight.delete(&tid);
    u64 len = moved_bytes(ctx, &call);
    if (len == 0)
        return 0;

    int zero = 0;
    struct tls_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    struct conn_key key = {};
    key.ssl = call.ssl;
    key.pid = pid_tgid >> 32;
    struct tls_head *head = &ev->head;
    head->start_ns = call.start_ns;
    head->end_ns = bpf_ktime_get_ns();
    head->ssl = call.ssl;
    head->offset = take_offset(&key, call.direction, len);
    head->length = len;
    head->pid = key.pid;
    head->tid = tid;
    head->direction = call.direction;
    bpf_get_current_comm(&head->comm, sizeof(head->comm));

    u32 want = clamp_len(len, CAPTURE_MAX);
    u32 size;
    long err;
    if (want >= CAPTURE_MAX) {
        err = bpf_probe_read_user(ev->data, CAPTURE_MAX, (void *)call.buf);
        size = sizeof(struct tls_event);
    } else {
        want &= CAPTURE_MAX - 1;
        err = bpf_probe_read_user(ev->data, want, (void *)call.buf);
        size = sizeof(struct tls_head) + want;
    }
    if (err != 0) { /* unreadable buffer: user space counts the bytes without seeing them */
        want = 0;
        size = sizeof(struct tls_head);
    }
    head->captured = want;
    emit_record(ev, size);
    stat_inc(STAT_OPERATIONS);
    return 0;
}

/* SSL_free(ssl): the end of a connection we saw data on. */
int on_free(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct conn_key key = {};
    key.ssl = PT_REGS_PARM1(ctx);
    key.pid = pid_tgid >> 32;
    struct conn_offsets *offsets = conns.lookup(&key);
    if (!offsets)
        return 0;
    struct tls_head close = {};
    close.start_ns = bpf_ktime_get_ns();
    close.end_ns = close.start_ns;
    close.ssl = key.ssl;
    close.offset = offsets->read;
    close.length = offsets->write;
    close.pid = key.pid;
    close.tid = (u32)pid_tgid;
    close.direction = DIR_CLOSE;
    bpf_get_current_comm(&close.comm, sizeof(close.comm));
    conns.delete(&key);
    emit_record(&close, sizeof(close));
    return 0;
}
