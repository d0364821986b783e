/* nginx: one record per client request, from two uprobes per request.
 *
 * ngx_http_process_request(r) runs once per client request, when its header has
 * been read and parsed (HTTP/1.x and HTTP/2 streams alike); internal redirects and
 * subrequests never pass through it. ngx_http_free_request(r, rc) runs once per
 * client request too, just before nginx writes the access log line, on keep-alive,
 * pipelining and connection close alike. They are paired here by (process, r).
 *
 * A request that ends without having passed ngx_http_process_request was rejected
 * while its header was read (400, 408, 414, 494: nginx logs those too) or began
 * before the probes were attached: it starts at nginx's own start time (wall clock,
 * milliseconds). One with no status either (an internal helper request, e.g. for
 * variables in ssl_certificate) is not a client request: counted as unmatched.
 *
 * Struct offsets come as -D cflags from otel_ebpf/targets/nginx.py, group by group
 * (DWARF or the table in usdt/nginx-offsets.yaml); a group left out is not read and
 * its attributes are not exported. Groups and their macros:
 *   HAVE_MAIN      R_MAIN                                     subrequest guard
 *   HAVE_METHOD    R_METHOD
 *   HAVE_VERSION   R_HTTP_VERSION
 *   HAVE_STATUS    R_CONNECTION R_STATUS R_ERR_STATUS C_SENT
 *   HAVE_URI       R_UNPARSED_URI
 *   HAVE_CLIENT    R_CONNECTION C_SOCKADDR
 *   HAVE_SERVER    R_CONNECTION C_LOCAL_SOCKADDR
 *   HAVE_SCHEME    R_CONNECTION C_SSL
 *   HAVE_UA        R_USER_AGENT TE_VALUE
 *   HAVE_NGX_START R_START_SEC R_START_MSEC, and WALL_MINUS_MONO_NS (measured at plan time)
 * Sizes: URI_MAX, UA_MAX (powers of two).
 */
#include "common.h"

#ifndef URI_MAX
#define URI_MAX 1024
#endif
#ifndef UA_MAX
#define UA_MAX 256
#endif
#ifndef WALL_MINUS_MONO_NS
#define WALL_MINUS_MONO_NS 0ULL
#endif
/* A group not defined on the command line is not read. */
#ifndef HAVE_MAIN
#define HAVE_MAIN 0
#endif
#ifndef HAVE_METHOD
#define HAVE_METHOD 0
#endif
#ifndef HAVE_VERSION
#define HAVE_VERSION 0
#endif
#ifndef HAVE_STATUS
#define HAVE_STATUS 0
#endif
#ifndef HAVE_URI
#define HAVE_URI 0
#endif
#ifndef HAVE_CLIENT
#define HAVE_CLIENT 0
#endif
#ifndef HAVE_SERVER
#define HAVE_SERVER 0
#endif
#ifndef HAVE_SCHEME
#define HAVE_SCHEME 0
#endif
#ifndef HAVE_UA
#define HAVE_UA 0
#endif
#ifndef HAVE_NGX_START
#define HAVE_NGX_START 0
#endif
#define HTTP_VERSION_9 9
#define HTTP_VERSION_10 1000
#define HTTP_VERSION_11 1001
#define HTTP_VERSION_20 2000
#define HTTP_VERSION_30 3000

/* Which attribute groups a record carries (mirrored in otel_ebpf/targets/nginx.py). */
#define F_METHOD (1 << 0)
#define F_VERSION (1 << 1)
#define F_STATUS (1 << 2)
#define F_URI (1 << 3)
#define F_CLIENT (1 << 4)
#define F_SERVER (1 << 5)
#define F_SCHEME (1 << 6)
#define F_UA (1 << 7)
#define F_NGX_START (1 << 8) /* start_ns is 0: the request started at start_wall_ms */
#define F_URI_CUT (1 << 9)   /* the URI was longer than URI_MAX */

struct req_key {
    u64 r;
    u32 tgid;
    u32 pad;
};

struct ngx_str {
    u64 len;
    u64 data;
};

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
    u32 uri_len;       /* bytes copied into uri[] */
    u32 ua_len;        /* bytes copied into ua[] */
    u8 client[28];     /* struct sockaddr_in / sockaddr_in6 of the client */
    u32 pad2;
    char ua[UA_MAX];
    char uri[URI_MAX]; /* last: the record is cut after uri_len bytes */
};

BPF_TABLE("lru_hash", struct req_key, u64, inflight, INFLIGHT_MAX);
BPF_PERCPU_ARRAY(scratch, struct nginx_event, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);
BPF_HASH(hist, struct hist_key, u64, HIST_MAX);
BPF_HASH(hist_sum, u64, u64, HIST_MAX);

static __always_inline void stat_inc(int index)
{
    u64 *value = stats.lookup(&index);
    if (value)
        (*value)++;
}

static __always_inline u64 read_u64(u64 addr)
{
    u64 value = 0;
    bpf_probe_read_user(&value, sizeof(value), (void *)addr);
    return value;
}

int on_request_start(struct pt_regs *ctx)
{
    struct req_key key = {};
    key.r = PT_REGS_PARM1(ctx);
    key.tgid = bpf_get_current_pid_tgid() >> 32;
    u64 now = bpf_ktime_get_ns();
    inflight.update(&key, &now);
    return 0;
}

/* Low-cardinality histogram key: method bit, status, scheme, protocol version
 * (0 = not known). Decoded by NginxTarget.hist_attributes(). */
static __always_inline u64 hist_dim(struct nginx_event *ev)
{
    u64 version = 0;
    if (ev->flags & F_VERSION) {
        switch (ev->http_version) {
        case HTTP_VERSION_9: version = 1; break;
        case HTTP_VERSION_10: version = 2; break;
        case HTTP_VERSION_11: version = 3; break;
        case HTTP_VERSION_20: version = 4; break;
        case HTTP_VERSION_30: version = 5; break;
        default: version = 6; break;
        }
    }
    u64 scheme = (ev->flags & F_SCHEME) ? 1 + ev->https : 0;
    u64 status = (ev->flags & F_STATUS) ? (ev->status & 0xffff) : 0;
    u64 method = (ev->flags & F_METHOD) ? ev->method : 0;
    return method << 32 | scheme << 24 | version << 16 | status;
}

static __always_inline void record_duration(u64 dim, u64 ns)
{
    struct hist_key key = {};
    key.dim = dim;
    key.bucket = duration_bucket(ns);
    u64 zero = 0;
    u64 *count = hist.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    u64 *sum = hist_sum.lookup_or_try_init(&dim, &zero);
    if (sum)
        __sync_fetch_and_add(sum, ns);
}

/* The status nginx logs: err_status, else headers_out.status, which
 * ngx_http_free_request replaces with rc when rc > 0 and nothing was sent. */
static __always_inline u32 final_status(u64 r, u64 conn, s64 rc)
{
    u64 status = 0;
#if HAVE_STATUS
    status = read_u64(r + R_STATUS);
    if (rc > 0 && (status == 0 || read_u64(conn + C_SENT) == 0))
        status = rc;
    u64 err_status = read_u64(r + R_ERR_STATUS);
    if (err_status)
        status = err_status;
#endif
    return status > 999 ? 0 : (u32)status;
}

static __always_inline void read_strings(struct nginx_event *ev, u64 r)
{
    ev->uri_len = 0;
    ev->ua_len = 0;
#if HAVE_URI
    struct ngx_str uri = {};
    bpf_probe_read_user(&uri, sizeof(uri), (void *)(r + R_UNPARSED_URI));
    if (uri.len > URI_MAX)
        ev->flags |= F_URI_CUT;
    u32 n = clamp_len(uri.len, URI_MAX);
    if (uri.data && n > 0 && bpf_probe_read_user(ev->uri, n, (void *)uri.data) == 0)
        ev->uri_len = n;
#endif
#if HAVE_UA
    u64 header = read_u64(r + R_USER_AGENT);
    if (header) {
        struct ngx_str ua = {};
        bpf_probe_read_user(&ua, sizeof(ua), (void *)(header + TE_VALUE));
        u32 m = clamp_len(ua.len, UA_MAX);
        if (ua.data && m > 0 && bpf_probe_read_user(ev->ua, m, (void *)ua.data) == 0)
            ev->ua_len = m;
    }
#endif
}

static __always_inline void read_connection(struct nginx_event *ev, u64 conn)
{
    if (!conn)
        return;
#if HAVE_CLIENT
    u64 sa = read_u64(conn + C_SOCKADDR);
    if (sa && bpf_probe_read_user(ev->client, sizeof(ev->client), (void *)sa) == 0)
        ev->flags |= F_CLIENT;
#endif
#if HAVE_SERVER
    u64 local = read_u64(conn + C_LOCAL_SOCKADDR);
    u16 port_be = 0;
    if (local && bpf_probe_read_user(&port_be, sizeof(port_be), (void *)(local + 2)) == 0) {
        ev->server_port = (port_be >> 8) | ((port_be & 0xff) << 8);
        ev->flags |= F_SERVER;
    }
#endif
}

int on_request_end(struct pt_regs *ctx)
{
    u64 end = bpf_ktime_get_ns();
    u64 r = PT_REGS_PARM1(ctx);
    s64 rc = (s64)PT_REGS_PARM2(ctx);
    struct req_key key = {};
    key.r = r;
    key.tgid = bpf_get_current_pid_tgid() >> 32;

#if HAVE_MAIN
    if (read_u64(r + R_MAIN) != r)
        return 0; /* a subrequest: never freed on its own in nginx 1.x, but be sure */
#endif
    u64 start = 0;
    u64 *started = inflight.lookup(&key);
    if (started) {
        start = *started;
        inflight.delete(&key);
    }

    int zero = 0;
    struct nginx_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    ev->flags = 0;
    ev->start_ns = start;
    ev->end_ns = end;
    ev->start_wall_ms = 0;
    ev->pid = key.tgid;
    ev->server_port = 0;
    ev->https = 0;

    u64 conn = 0;
#if HAVE_STATUS || HAVE_CLIENT || HAVE_SERVER || HAVE_SCHEME
    conn = read_u64(r + R_CONNECTION);
#endif
    ev->status = final_status(r, conn, rc);
#if HAVE_STATUS
    ev->flags |= F_STATUS;
#endif

    u64 duration = end - start;
    if (!started) {
        /* Not a client request at all (no status), or no way to date it: drop. */
        if (ev->status == 0) {
            stat_inc(STAT_UNMATCHED);
            return 0;
        }
#if HAVE_NGX_START
        u64 sec = read_u64(r + R_START_SEC);
        u64 msec = read_u64(r + R_START_MSEC);
        ev->start_wall_ms = sec * 1000 + msec;
        ev->flags |= F_NGX_START;
        u64 start_wall_ns = ev->start_wall_ms * 1000000ULL;
        u64 end_wall_ns = end + WALL_MINUS_MONO_NS;
        duration = end_wall_ns > start_wall_ns ? end_wall_ns - start_wall_ns : 0;
#else
        stat_inc(STAT_UNMATCHED);
        return 0;
#endif
    }

#if HAVE_METHOD
    ev->method = (u32)read_u64(r + R_METHOD);
    ev->flags |= F_METHOD;
#else
    ev->method = 0;
#endif
#if HAVE_VERSION
    ev->http_version = (u32)read_u64(r + R_HTTP_VERSION);
    ev->flags |= F_VERSION;
#else
    ev->http_version = 0;
#endif
#if HAVE_SCHEME
    if (conn) {
        ev->https = read_u64(conn + C_SSL) != 0;
        ev->flags |= F_SCHEME;
    }
#endif

    record_duration(hist_dim(ev), duration);
    stat_inc(STAT_OPERATIONS);
    if (!sample_keep(duration, ev->status >= 500)) {
        stat_inc(STAT_SAMPLED_OUT);
        return 0;
    }

    read_connection(ev, conn);
    read_strings(ev, r);
    if (ev->uri_len > 0)
        ev->flags |= F_URI;
    if (ev->ua_len > 0)
        ev->flags |= F_UA;
    u32 size = offsetof(struct nginx_event, uri) + (ev->uri_len & (URI_MAX - 1));
    if (ev->uri_len >= URI_MAX)
        size = sizeof(struct nginx_event);
    stat_inc(events.ringbuf_output(ev, size, 0) == 0 ? STAT_EVENTS : STAT_LOST);
    return 0;
}
