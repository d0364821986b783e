/* The USDT catalog: any start/done pair of USDT probes, described as data in
 * the usdt/catalog YAML files (otel_ebpf/usdt_catalog.py), paired in the kernel: one histogram
 * count per finished pair, and a record when the pair's entry asks for spans.
 *
 * One program serves every pair of one binary (up to 8): the functions of pair i are
 * on_start_<i> and on_done_<i>, and everything that differs between pairs comes as -D
 * cflags from otel_ebpf/targets/usdt.py:
 *   PAIRS             how many pairs
 *   P<i>_ID           the pair's number in the whole catalog (in records and histogram keys)
 *   P<i>_KEY_START, P<i>_KEY_DONE    the pairing key at each probe: 0 = the thread,
 *                     else an argument expression both probes share
 *   P<i>_S<j>, P<i>_D<j>  (j < SLOTS)   integer attribute j read at start / at done
 *                     (the other one is 0)
 *   P<i>_SS<k>, P<i>_DS<k> (k < STRINGS)  address of string attribute k at start / done
 *   P<i>_DIM1, P<i>_DIM2   the slots (or -1) of the histogram's attributes
 *   P<i>_METRIC, P<i>_SPAN  1/0;  P<i>_MIN_NS  shortest duration sent as a span
 *   P<i>_RESOURCE     at done: the pid whose Resource the span belongs to (0: the process)
 */
#include "common.h"
#include "usdt.h"

#ifndef PAIRS
#define PAIRS 0
#endif

struct pair_key {
    u64 key;
    u32 pair;
    u32 tgid;
};

struct pair_start {
    u64 start_ns;
    u64 args[SLOTS];
    u32 str_len[STRINGS];
    char str[STRINGS][STR_MAX];
};

BPF_TABLE("lru_hash", struct pair_key, struct pair_start, inflight, INFLIGHT_MAX);
BPF_PERCPU_ARRAY(start_scratch, struct pair_start, 1);
BPF_PERCPU_ARRAY(scratch, struct usdt_event, 1);

static __always_inline u32 read_string(char *dst, u64 src)
{
    if (!src)
        return 0;
    long n = bpf_probe_read_user_str(dst, STR_MAX, (void *)src);
    return n > 1 ? (u32)(n - 1) : 0;
}

static __always_inline int watched(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    /* not the agent itself: a Python catalog entry would see the agent's own GCs */
    return tgid != agent_const(CONST_AGENT_PID) && pid_selected();
}

static __always_inline struct pair_key key_of(u32 pair, u64 arg_key)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct pair_key key = {};
    key.key = arg_key ? arg_key : (u32)pid_tgid;
    key.pair = pair;
    key.tgid = pid_tgid >> 32;
    return key;
}

static __always_inline int pair_start(u32 pair, u64 arg_key, u64 *args, u64 s0, u64 s1)
{
    int zero = 0;
    struct pair_start *st = start_scratch.lookup(&zero);
    if (!st)
        return 0;
    struct pair_key key = key_of(pair, arg_key);
    if (inflight.lookup(&key))
        stat_inc(STAT_UNMATCHED); /* the previous start of this key never finished */
    st->start_ns = bpf_ktime_get_ns();
#pragma unroll
    for (int j = 0; j < SLOTS; j++)
        st->args[j] = args[j];
    st->str_len[0] = read_string(st->str[0], s0);
    st->str_len[1] = read_string(st->str[1], s1);
    inflight.update(&key, st);
    return 0;
}

static __always_inline u64 slot(u64 *args, int index)
{
    u64 value = 0;
#pragma unroll
    for (int j = 0; j < SLOTS; j++)
        if (j == index)
            value = args[j];
    return value;
}

static __always_inline int pair_done(u32 pair, u64 arg_key, u64 *args, u64 d0, u64 d1,
                                     int dim1, int dim2, int metric, int span, u64 min_ns, u32 resource_pid)
{
    struct pair_key key = key_of(pair, arg_key);
    struct pair_start *st = inflight.lookup(&key);
    if (!st) {
        stat_inc(STAT_UNMATCHED);
        return 0;
    }
    int zero = 0;
    struct usdt_event *ev = scratch.lookup(&zero);
    if (!ev) {
        inflight.delete(&key);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    u64 duration = now - st->start_ns;
#pragma unroll
    for (int j = 0; j < SLOTS; j++)
        ev->args[j] = st->args[j] + args[j]; /* each slot is read at one of the two probes */
    if (metric) {
        u64 dim = (u64)pair << 48;
        if (dim1 >= 0)
            dim |= (slot(ev->args, dim1) & 0xFFFFFF) << 24;
        if (dim2 >= 0)
            dim |= slot(ev->args, dim2) & 0xFFFFFF;
        hist_record(dim, duration);
    } else {
        stat_inc(STAT_OPERATIONS);
    }
    if (!span || duration < min_ns || !sample_keep(now, duration, 0)) {
        inflight.delete(&key);
        return 0;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    ev->start_ns = st->start_ns;
    ev->end_ns = now;
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->pair = pair;
    ev->resource_pid = resource_pid;
    ev->str_len[0] = st->str_len[0];
    ev->str_len[1] = st->str_len[1];
    bpf_probe_read_kernel(ev->str[0], STR_MAX, st->str[0]);
    bpf_probe_read_kernel(ev->str[1], STR_MAX, st->str[1]);
    if (d0)
        ev->str_len[0] = read_string(ev->str[0], d0);
    if (d1)
        ev->str_len[1] = read_string(ev->str[1], d1);
    inflight.delete(&key);
    emit_record(ev, sizeof(*ev));
    return 0;
}

#define PAIR_FUNCTIONS(i)                                                                          \
    int on_start_##i(struct pt_regs *ctx)                                                          \
    {                                                                                              \
        if (!watched())                                                                            \
            return 0;                                                                              \
        u64 args[SLOTS] = {P##i##_S0, P##i##_S1, P##i##_S2, P##i##_S3, P##i##_S4, P##i##_S5};      \
        return pair_start(P##i##_ID, P##i##_KEY_START, args, P##i##_SS0, P##i##_SS1);              \
    }                                                                                              \
    int on_done_##i(struct pt_regs *ctx)                                                           \
    {                                                                                              \
        if (!watched())                                                                            \
            return 0;                                                                              \
        u64 args[SLOTS] = {P##i##_D0, P##i##_D1, P##i##_D2, P##i##_D3, P##i##_D4, P##i##_D5};      \
        return pair_done(P##i##_ID, P##i##_KEY_DONE, args, P##i##_DS0, P##i##_DS1, P##i##_DIM1, P##i##_DIM2, \
                         P##i##_METRIC, P##i##_SPAN, P##i##_MIN_NS, (u32)(P##i##_RESOURCE));       \
    }

#if PAIRS > 0
PAIR_FUNCTIONS(0)
#endif
#if PAIRS > 1
PAIR_FUNCTIONS(1)
#endif
#if PAIRS > 2
PAIR_FUNCTIONS(2)
#endif
#if PAIRS > 3
PAIR_FUNCTIONS(3)
#endif
#if PAIRS > 4
PAIR_FUNCTIONS(4)
#endif
#if PAIRS > 5
PAIR_FUNCTIONS(5)
#endif
#if PAIRS > 6
PAIR_FUNCTIONS(6)
#endif
#if PAIRS > 7
PAIR_FUNCTIONS(7)
#endif
