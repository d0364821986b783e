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
 *   BPF_ARRAY(sampling, u32, 1);                        the agent's current ratio + 1 (0: unset)
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

/* The span budget (max_spans_per_second) as a GCRA, "virtual scheduling": `*due` is when
 * the next span is due; a span fits while that is at most SPAN_BURST_NS ahead of now, and
 * pushes it SPAN_INTERVAL_NS (1 s / the limit) later. It caps a burst at once, where the
 * agent's adaptive ratio (below) needs a quarter of a second to see it. Two CPUs racing
 * may let one extra span through. SPAN_INTERVAL_NS 0: no budget. */
#ifndef SPAN_INTERVAL_NS
#define SPAN_INTERVAL_NS 0ULL
#endif
#ifndef SPAN_BURST_NS
#define SPAN_BURST_NS 100000000ULL
#endif

static __always_inline int within_budget(u64 *due, u64 now)
{
    if (SPAN_INTERVAL_NS == 0 || !due)
        return 1;
    u64 next = *due;
    if (next > now + SPAN_BURST_NS)
        return 0;
    *due = (next > now ? next : now) + SPAN_INTERVAL_NS;
    return 1;
}

/* Whether a finished operation goes to the ring buffer as a span: failed and slow ones
 * always; the rest with the current ratio `permille` (SAMPLE_PERMILLE, or lower while the
 * agent sheds load above its span rate limit: the `sampling` array of the C files), then
 * within the span budget (`due`: the C file's `span_budget` array). */
static __always_inline int sample_keep(u64 now, u64 duration_ns, int failed, u32 permille, u64 *due)
{
    if (failed || duration_ns >= SLOW_NS)
        return 1;
    if (permille < 1000 && bpf_get_prandom_u32() % 1000 >= permille)
        return 0;
    return within_budget(due, now);
}

/* SQL statement kind from the first keyword, for low-cardinality metric keys.
 * Mirrored by SQL_OPERATIONS in otel_ebpf/targets/base.py; 0 = other.
 * Keywords are compared as little-endian u64 words: no string literals (they
 * would live in a read-only section bcc cannot load) and no memcmp calls. */
#define KW_C(ch, i) ((u64)(unsigned char)(ch) << (8 * (i)))
#define KW3(a, b, c) (KW_C(a, 0) | KW_C(b, 1) | KW_C(c, 2))
#define KW4(a, b, c, d) (KW3(a, b, c) | KW_C(d, 3))
#define KW5(a, b, c, d, e) (KW4(a, b, c, d) | KW_C(e, 4))
#define KW6(a, b, c, d, e, f) (KW5(a, b, c, d, e) | KW_C(f, 5))
#define KW7(a, b, c, d, e, f, g) (KW6(a, b, c, d, e, f) | KW_C(g, 6))
#define KW8(a, b, c, d, e, f, g, h) (KW7(a, b, c, d, e, f, g) | KW_C(h, 7))
#define KW_MASK(n) ((n) == 8 ? ~0ULL : ((1ULL << (8 * (n))) - 1))

static __always_inline int is_word_char(char ch)
{
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || ch == '_' || (ch >= '0' && ch <= '9');
}

static __always_inline int is_blank(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '(';
}

/* Keyword at a constant offset of `q` (constant so the verifier sees fixed reads). */
static __always_inline u32 sql_operation_at(const char *q, const int off)
{
    u64 w = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        char ch = q[off + i];
        if (ch >= 'a' && ch <= 'z')
            ch -= 32;
        w |= KW_C(ch, i);
    }
#define IS(n, word) ((w & KW_MASK(n)) == (word) && !is_word_char(q[off + (n)]))
    if (IS(6, KW6('S', 'E', 'L', 'E', 'C', 'T'))) return 1;
    if (IS(6, KW6('I', 'N', 'S', 'E', 'R', 'T'))) return 2;
    if (IS(6, KW6('U', 'P', 'D', 'A', 'T', 'E'))) return 3;
    if (IS(6, KW6('D', 'E', 'L', 'E', 'T', 'E'))) return 4;
    if (IS(5, KW5('B', 'E', 'G', 'I', 'N')) || IS(5, KW5('S', 'T', 'A', 'R', 'T'))) return 5;
    if (IS(6, KW6('C', 'O', 'M', 'M', 'I', 'T')) || IS(3, KW3('E', 'N', 'D'))) return 6;
    if (IS(8, KW8('R', 'O', 'L', 'L', 'B', 'A', 'C', 'K')) || IS(5, KW5('A', 'B', 'O', 'R', 'T'))) return 7;
    if (IS(4, KW4('W', 'I', 'T', 'H'))) return 8;
    if (IS(4, KW4('C', 'A', 'L', 'L'))) return 9;
    if (IS(6, KW6('C', 'R', 'E', 'A', 'T', 'E'))) return 10;
    if (IS(4, KW4('D', 'R', 'O', 'P'))) return 11;
    if (IS(5, KW5('A', 'L', 'T', 'E', 'R'))) return 12;
    if (IS(3, KW3('S', 'E', 'T'))) return 13;
    if (IS(4, KW4('S', 'H', 'O', 'W'))) return 14;
    if (IS(4, KW4('C', 'O', 'P', 'Y'))) return 15;
    if (IS(7, KW7('R', 'E', 'P', 'L', 'A', 'C', 'E'))) return 16;
    if (IS(8, KW8('T', 'R', 'U', 'N', 'C', 'A', 'T', 'E'))) return 17;
    if (IS(7, KW7('E', 'X', 'P', 'L', 'A', 'I', 'N'))) return 18;
#undef IS
    return 0;
}

/* `q` holds at least 16 bytes of BPF memory (the head of the query); up to three
 * leading blanks or parentheses are skipped. */
static __always_inline u32 sql_operation(const char *q)
{
    if (!is_blank(q[0]))
        return sql_operation_at(q, 0);
    if (!is_blank(q[1]))
        return sql_operation_at(q, 1);
    if (!is_blank(q[2]))
        return sql_operation_at(q, 2);
    return sql_operation_at(q, 3);
}

/* Kernel macros such as min() type-check their arguments and do not compile with
 * the fallback headers; this is all we need. */
static __always_inline u32 clamp_len(u64 len, u32 max)
{
    return len > max ? max : (u32)len;
}

#endif
