/* OpenSSL: the records probes/openssl.c sends per SSL_read/SSL_write call and per close.
 * Decoded by otel_ebpf/targets/openssl.py (RECORD), checked by tests/unit/test_contract.py. */
#ifndef OTEL_EBPF_OPENSSL_H
#define OTEL_EBPF_OPENSSL_H

#ifndef CAPTURE_MAX
#define CAPTURE_MAX 4096
#endif

#define DIR_READ 0
#define DIR_WRITE 1
#define DIR_CLOSE 2

/* A close record is the head
 * alone: offset and length then hold the final read and write offsets. */
struct tls_head {
    u64 start_ns; /* the call's entry */
    u64 end_ns;   /* its return */
    u64 ssl;
    u64 offset;   /* stream offset of data[0] in this direction */
    u64 length;   /* bytes the call moved (data[] holds the first `captured`) */
    u32 pid;
    u32 tid;
    u32 direction;
    u32 captured;
    char comm[16];
};

struct tls_event {
    struct tls_head head;
    u8 data[CAPTURE_MAX];
};

#endif
