/* nginx: the record probes/nginx.c sends per client request.
 * Decoded by otel_ebpf/targets/nginx.py (RECORD), checked by tests/unit/test_contract.py. */
#ifndef OTEL_EBPF_NGINX_H
#define OTEL_EBPF_NGINX_H

#ifndef URI_MAX
#define URI_MAX 1024
#endif
#ifndef UA_MAX
#define UA_MAX 256
#endif

#define HTTP_VERSION_9 9
#define HTTP_VERSION_10 1000
#define HTTP_VERSION_11 1001
#define HTTP_VERSION_20 2000
#define HTTP_VERSION_30 3000

/* Which attribute groups a record carries (F_* in otel_ebpf/targets/nginx.py). */
#define F_METHOD (1 << 0)
#define F_VERSION (1 << 1)
#define F_STATUS (1 << 2)
#define F_URI (1 << 3)
#define F_CLIENT (1 << 4)
#define F_SERVER (1 << 5)
#define F_SCHEME (1 << 6)
#define F_UA (1 << 7)
#define F_NGX_START (1 << 8) /* start_ns is 0: the request started at start_wall_ms */
#define F_URI_CUT (1 << 9)   /* the URI was longer than URI_MAX - 1 bytes */
#define F_TRACEPARENT (1 << 10) /* traceparent[] holds the request's traceparent header */

#define TP_MAX 64 /* a traceparent header is 55 characters */

struct nginx_event {
    u64 start_ns;      /* CLOCK_MONOTONIC at ngx_http_process_request, 0 when F_NGX_START */
    u64 end_ns;        /* CLOCK_MONOTONIC at ngx_http_free_request */
    u64 start_wall_ms; /* nginx's r->start_sec/start_msec, when F_NGX_START */
    u32 pid;
    u32 flags;
    u32 method;        /* NGX_HTTP_GET (2), NGX_HTTP_POST (8), ... a single bit */
    u32 http_version;  /* 9, 1000, 1001, 2000, 3000 */
    u32 status;
    u16 server_port;   /* host order */
    u8 https;
    u8 pad;
    u32 ua_len;        /* data[0 .. ua_len) is the User-Agent */
    u32 uri_len;       /* data[ua_len .. ua_len + uri_len) is the URI; the record ends there */
    u8 client[28];     /* struct sockaddr_in / sockaddr_in6 of the client */
    u32 tp_len;
    char traceparent[TP_MAX];
    char data[UA_MAX + URI_MAX];
};

#endif
