/* The USDT catalog: the record probes/usdt.c sends per finished start/done pair.
 * Decoded by otel_ebpf/targets/usdt.py (RECORD), checked by tests/unit/test_contract.py. */
#ifndef OTEL_EBPF_USDT_H
#define OTEL_EBPF_USDT_H

#define SLOTS 6     /* integer attributes per pair (otel_ebpf/usdt_catalog.py MAX_SLOTS) */
#define STRINGS 2   /* string attributes per pair */
#ifndef STR_MAX
#define STR_MAX 128
#endif

struct usdt_event {
    u64 start_ns;
    u64 end_ns;
    u32 pid;
    u32 tid;
    u32 pair;        /* the pair's number in the catalog (P<i>_ID) */
    u32 resource_pid; /* P<i>_RESOURCE: the pid whose Resource the span belongs to (0: pid) */
    u64 args[SLOTS]; /* integer attributes, in the pair's order */
    u32 str_len[STRINGS];
    char str[STRINGS][STR_MAX];
};

#endif
