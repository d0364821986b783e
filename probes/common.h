/* The prelude of every probe file: the maps every program has and the helpers around
 * them, written once. bcc rewrites map calls (`stats.lookup(...)`) only in the text it
 * compiles, not in headers it includes itself: otel_ebpf/bpf.py therefore inlines this
 * file (and every other local "..." include) into one text before handing it to bcc.
 *
 * Shared constants come from otel_ebpf/contract.py as -D cflags (prelude_cflags):
 *   STAT_*, STAT_MAX          indexes of `stats`
 *   DURATION_BUCKET_CHAIN     DURATION_BUCKET(index, upper bound ns) ..., DURATION_BUCKET_INF
 *   SQL_KEYWORD_CHAIN         SQL_KEYWORD(length, code, little-endian u64 of the word) ...
 * and per agent (otel_ebpf/attacher.py): RINGBUF_PAGES, SAMPLE_PERMILLE, SLOW_NS,
 * SPAN_INTERVAL_NS, SPAN_BURST_NS, PID_FILTER, PARENT_BASED. A program that keeps no kernel histograms defines
 * NO_KERNEL_HISTOGRAMS.
 *
 * Maps (read by otel_ebpf/kstats.py through bpf.Program):
 *   events       ring buffer of records (one per kept span, or per call for openssl)
 *   stats        per-CPU counters
 *   hist         duration histogram counts by (dim, bucket)
 *   hist_sum     duration sums (ns) by dim
 *   span_budget  when the next span is due under the span budget (GCRA)
 *   parent_budget  the same, for spans kept over the budget because their parent was sampled
 *   parents_until  until when (monotonic ns) the agent saw this program's spans join traces:
 *                the kernel looks for a sampled parent in a dropped span only meanwhile
 *   agent_consts what the agent knows only when it runs (its pid, the clock offset), set
 *                before the probes attach: as -D flags they would change the program at
 *                every start and defeat the cache of compiled programs
 * `dim` is a target-defined low-cardinality key, decoded by its Target.hist_attributes().
 */
#ifndef OTEL_EBPF_COMMON_H
#define OTEL_EBPF_COMMON_H

#include <uapi/linux/ptrace.h>

#ifndef STAT_MAX
#error "shared constants come as -D cflags from otel_ebpf/contract.py (prelude_cflags)"
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef INFLIGHT_MAX
#define INFLIGHT_MAX 10240
#endif
#ifndef HIST_MAX
#define HIST_MAX 4096
#endif
#ifndef SAMPLE_PERMILLE
#define SAMPLE_PERMILLE 1000
#endif
#ifndef SLOW_NS
#define SLOW_NS 500000000ULL
#endif
#ifndef SPAN_INTERVAL_NS
#define SPAN_INTERVAL_NS 0ULL
#endif
#ifndef SPAN_BURST_NS
#define SPAN_BURST_NS 1000000000ULL
#endif
#ifndef PARENT_BASED
#define PARENT_BASED 1 /* OTEL_TRACES_SAMPLER parentbased_*: a sampled parent keeps its child */
#endif
/* agent_consts indexes (attacher.AGENT_CONSTS) */
#define CONST_AGENT_PID 0
#define CONST_WALL_MINUS_MONO_NS 1
#define AGENT_CONSTS 2

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);
BPF_ARRAY(span_budget, u64, 1);
BPF_ARRAY(parent_budget, u64, 1);
BPF_ARRAY(parents_until, u64, 1);
BPF_ARRAY(agent_consts, u64, AGENT_CONSTS);

/* Process selection (discovery.py: listening ports, containers). PID_FILTER 1: only the
 * processes in `pid_filter`; 2: every process but those; 0 (default): every process.
 * The agent fills the map at each rescan; children forked by a listed process (database
 * backends, web server workers) join it at once, through the fork tracepoint. */
#ifndef PID_FILTER
#define PID_FILTER 0
#endif
#if PID_FILTER
BPF_TABLE("lru_hash", u32, u8, pid_filter, 16384);

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (pid_filter.lookup(&parent)) {
        u32 child = args->child_pid;
        u8 one = 1;
        pid_filter.update(&child, &one);
    }
    return 0;
}

static __always_inline int pid_selected(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    int listed = pid_filter.lookup(&tgid) != 0;
    return PID_FILTER == 1 ? listed : !listed;
}
#else
#define pid_selected() 1
#endif

static __always_inline u64 agent_const(int index)
{
    u64 *value = agent_consts.lookup(&index);
    return value ? *value : 0;
}

static __always_inline void stat_inc(int index)
{
    u64 *value = stats.lookup(&index);
    if (value)
        (*value)++;
}

/* Send a record; counts it as an event or, when the ring buffer is full, as lost. */
static __always_inline void emit_record(void *record, u32 size)
{
    stat_inc(events.ringbuf_output(record, size, 0) == 0 ? STAT_EVENTS : STAT_LOST);
}

/* Bucket index for the stable duration boundaries; a value equal to a boundary falls in
 * that boundary's bucket, as OpenTelemetry counts. */
#define DURATION_BUCKET(index, bound) if (ns <= (bound)) return (index);
static __always_inline u32 duration_bucket(u64 ns)
{
    DURATION_BUCKET_CHAIN
    return DURATION_BUCKET_INF;
}
#undef DURATION_BUCKET

#ifndef NO_KERNEL_HISTOGRAMS
struct hist_key {
    u64 dim;
    u32 bucket;
    u32 pad;
};

BPF_HASH(hist, struct hist_key, u64, HIST_MAX);
BPF_HASH(hist_sum, u64, u64, HIST_MAX);

/* Count one finished operation in the histogram of `dim`. */
static __always_inline void hist_record(u64 dim, u64 duration_ns)
{
    struct hist_key key = {};
    key.dim = dim;
    key.bucket = duration_bucket(duration_ns);
    u64 zero = 0;
    u64 *count = hist.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    u64 *sum = hist_sum.lookup_or_try_init(&dim, &zero);
    if (sum)
        __sync_fetch_and_add(sum, duration_ns);
    stat_inc(STAT_OPERATIONS);
}
#endif

/* The span budget (max_spans_per_second) as a GCRA, "virtual scheduling": `due` is when
 * the next span is due; a span fits while that is at most SPAN_BURST_NS ahead of now, and
 * pushes it SPAN_INTERVAL_NS (1 s / the limit) later. With SPAN_BURST_NS = 1 s a quiet
 * agent takes a burst of a whole second's budget at once; sustained load above the limit
 * gets one span per interval. Two CPUs racing may let one extra span through. */
static __always_inline int gcra_admit(u64 *due, u64 now)
{
    if (SPAN_INTERVAL_NS == 0 || !due)
        return 1;
    u64 next = *due;
    if (next > now + SPAN_BURST_NS)
        return 0;
    *due = (next > now ? next : now) + SPAN_INTERVAL_NS;
    return 1;
}

static __always_inline int within_budget(u64 now)
{
    int zero = 0;
    return gcra_admit(span_budget.lookup(&zero), now);
}

/* Whether a finished operation goes to the ring buffer as a span: failed and slow ones
 * always; the rest with the configured ratio (SAMPLE_PERMILLE, a constant: no map read),
 * then within the span budget. Counts what it leaves out as STAT_SAMPLED_OUT. */
static __always_inline int sample_keep(u64 now, u64 duration_ns, int failed)
{
    if (failed || duration_ns >= SLOW_NS)
        return 1;
    if ((SAMPLE_PERMILLE < 1000 && bpf_get_prandom_u32() % 1000 >= SAMPLE_PERMILLE) || !within_budget(now)) {
        stat_inc(STAT_SAMPLED_OUT);
        return 0;
    }
    return 1;
}

/* A span the budget dropped may still go when its parent (from the application: a
 * sqlcommenter comment, a traceparent header) was sampled: sampled parents are kept
 * before unsampled spans while the budget is tight, within a budget of their own. Looking
 * for the parent costs, so the kernel does it only while the agent has lately seen this
 * program's spans join traces (`parents_until`). */
static __always_inline int parents_recently(u64 now)
{
    if (!PARENT_BASED)
        return 0;
    int zero = 0;
    u64 *until = parents_until.lookup(&zero);
    return until && now < *until;
}

/* The dropped span goes after all: its parent was sampled and the parents' budget has room. */
static __always_inline int keep_for_parent(u64 now)
{
    int zero = 0;
    if (!gcra_admit(parent_budget.lookup(&zero), now))
        return 0;
    int index = STAT_SAMPLED_OUT;
    u64 *value = stats.lookup(&index);
    if (value && *value)
        (*value)--;
    stat_inc(STAT_KEPT_BY_PARENT);
    return 1;
}

static __always_inline u32 hex_value(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : 16;
}

/* Whether the last TP_SUFFIX bytes of a text (s[TP_SUFFIX - 1] is its last character)
 * end a sqlcommenter comment whose last key is a sampled traceparent:
 * traceparent='00-<32 hex>-<16 hex>-<flags>' then the comment's close. Fixed offsets. */
#define TP_SUFFIX 72
#define TP_AT(k) s[TP_SUFFIX - (k)]
static __always_inline int sampled_traceparent_suffix(const char *s)
{
    if (TP_AT(1) != '/' || TP_AT(2) != '*' || TP_AT(3) != '\'' || TP_AT(6) != '-' || TP_AT(23) != '-' ||
        TP_AT(56) != '-' || TP_AT(59) != '\'' || TP_AT(60) != '=' || TP_AT(61) != 't' || TP_AT(71) != 't')
        return 0;
    u32 flags = hex_value(TP_AT(4));
    return flags < 16 && hex_value(TP_AT(5)) < 16 && (flags & 1);
}
#undef TP_AT

/* SQL statement kind from the first keyword, for low-cardinality metric keys. Keywords
 * and their codes come from otel_ebpf/contract.py (SQL_OPERATIONS); 0 = other. They are
 * compared as little-endian u64 words: no string literals (they would live in a
 * read-only section bcc cannot load) and no memcmp calls. */
#define KW_MASK(n) ((n) == 8 ? ~0ULL : ((1ULL << (8 * (n))) - 1))

/* 1 when lo <= c <= hi (c < 2^63), computed without a branch: the verifier walks both
 * sides of every branch on a query byte, and the paths of nine bytes never merge (each
 * leaves a different word-end mask): with branches here, loading one program took 1.5 s. */
static __always_inline u64 byte_in(u64 c, u64 lo, u64 hi)
{
    u64 x = c - lo; /* wraps when c < lo: its top bit is set then */
    return ((~x & (x - (hi - lo + 1))) >> 63) & 1;
}

static __always_inline u64 is_word_byte(u64 c)
{
    return byte_in(c, 'A', 'Z') | byte_in(c, 'a', 'z') | byte_in(c, '_', '_') | byte_in(c, '0', '9');
}

static __always_inline int is_blank(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '(';
}

/* The keyword at offset `off` (0-3) of `q`: the bytes are copied out first, so every
 * read of `q` is at a bounded offset the verifier accepts. */
#define SQL_KEYWORD(n, code, word) if ((w & KW_MASK(n)) == (word) && (ends >> (n)) & 1) return (code);
static __always_inline u32 sql_operation_at(const char *q, u32 off)
{
    u64 w = 0;
    u32 ends = 0; /* bit i: the byte at i ends a word (is no word character) */
    off &= 3;
#pragma unroll
    for (int i = 0; i < 9; i++) {
        u64 c = (unsigned char)q[off + i];
        ends |= (u32)(1 - is_word_byte(c)) << i;
        c -= byte_in(c, 'a', 'z') << 5; /* upper case */
        if (i < 8)
            w |= c << (8 * i);
    }
    SQL_KEYWORD_CHAIN
    return 0;
}
#undef SQL_KEYWORD

/* `q` holds at least 16 bytes of BPF memory (the head of the query); up to three
 * leading blanks or parentheses are skipped. One keyword comparison, not one per offset:
 * each inlined copy costs compile time. */
static __always_inline u32 sql_operation(const char *q)
{
    u32 off = 0;
#pragma unroll
    for (int i = 0; i < 3; i++)
        if (off == i && is_blank(q[i]))
            off = i + 1;
    return sql_operation_at(q, off);
}

/* Kernel macros such as min() type-check their arguments and do not compile with the
 * fallback headers; this is all we need. */
static __always_inline u32 clamp_len(u64 len, u32 max)
{
    return len > max ? max : (u32)len;
}

#endif
