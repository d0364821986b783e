/* Shared by every probe file: constants, the stats indexes, duration buckets,
 * sampling. Build-time constants come in as -D cflags from the target's Python
 * unit; the defaults here only make a file compile on its own.
 *
 * bcc rewrites map calls only in the main file (not in headers or macros), so
 * each probe file declares its own maps with the conventions below:
 *
 *   BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);        records for spans
 *   BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);            counters, indexes below
 *   BPF_HASH(hist, struct hist_key, u64, HIST_MAX);    duration histogram counts
 *   BPF_HASH(hist_sum, u64, u64, HIST_MAX);            duration sums (ns) per dim
 *
 * `dim` is a target-defined low-cardinality key (e.g. operation and status),
 * decoded back into metric attributes by the target's Python unit.
 */
#ifndef OTEL_EBPF_COMMON_H
#define OTEL_EBPF_COMMON_H

#include <uapi/linux/ptrace.h>

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef INFLIGHT_MAX
#define INFLIGHT_MAX 10240
#endif
#ifndef HIST_MAX
#define HIST_MAX 4096
#endif
/* Span sampling, decided here before the ring buffer: keep SAMPLE_PERMILLE of
 * 1000 operations, and always the failed ones and those of SLOW_NS or more. */
#ifndef SAMPLE_PERMILLE
#define SAMPLE_PERMILLE 1000
#endif
#ifndef SLOW_NS
#define SLOW_NS 500000000ULL
#endif

/* Indexes of the `stats` per-CPU array (mirrored in otel_ebpf/targets/base.py). */
enum stat_index {
    STAT_EVENTS = 0,      /* records written to the ring buffer */
    STAT_LOST = 1,        /* records lost: ring buffer full */
    STAT_UNMATCHED = 2,   /* an end without its start, or a start overwritten */
    STAT_SAMPLED_OUT = 3, /* finished operations not sent as spans (sampling) */
    STAT_OPERATIONS = 4,  /* finished operations, sent or not */
    STAT_MAX = 8,
};

struct hist_key {
    u64 dim;
    u32 bucket;
    u32 pad;
};

/* Bucket index for the stable duration boundaries (seconds): 0.005 0.01 0.025
 * 0.05 0.075 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10, then +Inf (index 14).
 * Mirrored by DURATION_BUCKETS in otel_ebpf/targets/base.py. A value equal to a
 * boundary falls in that boundary's bucket, as OpenTelemetry counts. */
static __always_inline u32 duration_bucket(u64 ns)
{
    if (ns <= 5000000ULL) return 0;
    if (ns <= 10000000ULL) return 1;
    if (ns <= 25000000ULL) return 2;
    if (ns <= 50000000ULL) return 3;
    if (ns <= 75000000ULL) return 4;
    if (ns <= 100000000ULL) return 5;
    if (ns <= 250000000ULL) return 6;
    if (ns <= 500000000ULL) return 7;
    if (ns <= 750000000ULL) return 8;
    if (ns <= 1000000000ULL) return 9;
    if (ns <= 2500000000ULL) return 10;
    if (ns <= 5000000000ULL) return 11;
    if (ns <= 7500000000ULL) return 12;
    if (ns <= 10000000000ULL) return 13;
    return 14;
}

/* Whether a finished operation goes to the ring buffer as a span. */
static __always_inline int sample_keep(u64 duration_ns, int failed)
{
    if (SAMPLE_PERMILLE >= 1000 || failed || duration_ns >= SLOW_NS)
        return 1;
    return bpf_get_prandom_u32() % 1000 < SAMPLE_PERMILLE;
}

/* SQL statement kind from the first keyword, for low-cardinality metric keys.
 * Mirrored by SQL_OPERATIONS in otel_ebpf/targets/base.py; 0 = other. */
static __always_inline u32 sql_operation(const char *q)
{
    char c[9] = {};
    int start = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        char ch = q[start];
        if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '(')
            start++;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        char ch = q[start + i];
        c[i] = (ch >= 'a' && ch <= 'z') ? ch - 32 : ch;
    }
#define KW(s, n) (__builtin_memcmp(c, s, n) == 0 && !((c[n] >= 'A' && c[n] <= 'Z') || c[n] == '_'))
    if (KW("SELECT", 6)) return 1;
    if (KW("INSERT", 6)) return 2;
    if (KW("UPDATE", 6)) return 3;
    if (KW("DELETE", 6)) return 4;
    if (KW("BEGIN", 5) || KW("START", 5)) return 5;
    if (KW("COMMIT", 6) || KW("END", 3)) return 6;
    if (KW("ROLLBACK", 8) || KW("ABORT", 5)) return 7;
    if (KW("WITH", 4)) return 8;
    if (KW("CALL", 4)) return 9;
    if (KW("CREATE", 6)) return 10;
    if (KW("DROP", 4)) return 11;
    if (KW("ALTER", 5)) return 12;
    if (KW("SET", 3)) return 13;
    if (KW("SHOW", 4)) return 14;
    if (KW("COPY", 4)) return 15;
    if (KW("REPLACE", 7)) return 16;
    if (KW("TRUNCATE", 8)) return 17;
    if (KW("EXPLAIN", 7)) return 18;
#undef KW
    return 0;
}

/* Kernel macros such as min() type-check their arguments and do not compile with
 * the fallback headers; this is all we need. */
static __always_inline u32 clamp_len(u64 len, u32 max)
{
    return len > max ? max : (u32)len;
}

#endif
