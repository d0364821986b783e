/* Shared by every probe: counters the agent exports as its own metrics.
 *
 * Build-time constants come in as -D cflags from the target's Python unit;
 * defaults here only make a file compile on its own for a quick check.
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

/* Indexes of the `stats` per-CPU array (mirrored in otel_ebpf/targets/base.py). */
enum stat_index {
    STAT_EVENTS = 0,      /* records written to the ring buffer */
    STAT_LOST = 1,        /* records lost: ring buffer full */
    STAT_UNMATCHED = 2,   /* an end without its start, or a start overwritten */
    STAT_SAMPLED_OUT = 3, /* finished operations not sent as spans (sampling) */
    STAT_OPERATIONS = 4,  /* finished operations, sent or not */
    STAT_MAX = 8,
};

/* Each probe file defines the `stats` array and its stat_inc() itself: bcc
 * rewrites map calls only in the main file, not in headers or macros. */

/* Kernel macros such as min() type-check their arguments and do not compile with
 * the fallback headers; this is all we need. */
static __always_inline u32 clamp_len(u64 len, u32 max)
{
    return len > max ? max : (u32)len;
}

#endif
