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
 *   HAVE_NGX_START R_START_SEC R_START_MSEC (and agent_const(CONST_WALL_MINUS_MONO_NS))
 *   HAVE_TRACEPARENT R_HEADERS TE_HASH TE_KEY TE_VALUE TE_SIZE, and TRACEPARENT_HASH (nginx's
 *                  hash of "traceparent", which it keeps for every header it parsed)
 * R_BLOCK and C_BLOCK are the bytes of ngx_http_request_t and ngx_connection_t that
 * hold every member read (multiples of 8, 0 for none): each is read with one helper
 * call, since a user read costs about 0.1 us here and there would be a dozen.
 * Sizes: URI_MAX, UA_MAX (powers of two; at most URI_MAX-1 and UA_MAX-1 bytes kept).
 */
#include "common.h"
#include "nginx.h"

#ifndef R_BLOCK
#define R_BLOCK 0
#endif
#ifndef C_BLOCK
#define C_BLOCK 0
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
#ifndef HAVE_TRACEPARENT
#define HAVE_TRACEPARENT 0
#endif
/* Headers of the first part of r->headers_in.headers looked at (nginx allocates 20). */
#define TP_SCAN 20

struct req_key {
    u64 r;
    u32 tgid;
    u32 pad;
};

struct ngx_str {
    u64 len;
    u64 data;
};

/* Per-CPU room for the record and the raw struct bytes it is read from. */
struct scratch_space {
    struct nginx_event ev;
    u8 request[R_BLOCK + 8];
    u8 connection[C_BLOCK + 8];
#if HAVE_TRACEPARENT
    u8 headers[TP_SCAN * TE_SIZE];
#endif
};

BPF_TABLE("lru_hash", struct req_key, u64, inflight, INFLIGHT_MAX);
BPF_PERCPU_ARRAY(scratch, struct scratch_space, 1);

#define R_FIELD(sp, off) (*(u64 *)((sp)->request + (off)))
#define C_FIELD(sp, off) (*(u64 *)((sp)->connection + (off)))

int on_request_start(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    struct req_key key = {};
    key.r = PT_REGS_PARM1(ctx);
    key.tgid = bpf_get_current_pid_tgid() >> 32;
    u64 now = bpf_ktime_get_ns();
    inflight.update(&key, &now);
    return 0;
}

/* Low-cardinality histogram key: method bit, scheme, protocol version, status
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

/* The status nginx logs: err_status, else headers_out.status, which
 * ngx_http_free_request replaces with rc when rc > 0 and nothing was sent. */
static __always_inline u32 final_status(struct scratch_space *sp, s64 rc)
{
    u64 status = 0;
#if HAVE_STATUS
    status = R_FIELD(sp, R_STATUS);
    if (rc > 0 && (status == 0 || C_FIELD(sp, C_SENT) == 0))
        status = rc;
    u64 err_status = R_FIELD(sp, R_ERR_STATUS);
    if (err_status)
        status = err_status;
#endif
    return status > 999 ? 0 : (u32)status;
}

/* The User-Agent, then the URI right after it: the record ends with the URI. */
static __always_inline void read_strings(struct scratch_space *sp, struct nginx_event *ev)
{
    u32 ua_len = 0;
    u32 uri_len = 0;
#if HAVE_UA
    u64 header = R_FIELD(sp, R_USER_AGENT);
    if (header) {
        struct ngx_str ua = {};
        bpf_probe_read_user(&ua, sizeof(ua), (void *)(header + TE_VALUE));
        u32 m = clamp_len(ua.len, UA_MAX - 1) & (UA_MAX - 1);
        if (ua.data && m > 0 && bpf_probe_read_user(ev->data, m, (void *)ua.data) == 0)
            ua_len = m;
    }
#endif
#if HAVE_URI
    u64 uri_size = R_FIELD(sp, R_UNPARSED_URI);
    u64 uri_data = R_FIELD(sp, R_UNPARSED_URI + 8);
    if (uri_size > URI_MAX - 1)
        ev->flags |= F_URI_CUT;
    u32 n = clamp_len(uri_size, URI_MAX - 1) & (URI_MAX - 1);
    u32 at = ua_len & (UA_MAX - 1);
    if (uri_data && n > 0 && bpf_probe_read_user(ev->data + at, n, (void *)uri_data) == 0)
        uri_len = n;
    ev->flags |= F_URI;
#endif
    if (ua_len)
        ev->flags |= F_UA;
    ev->ua_len = ua_len;
    ev->uri_len = uri_len;
}

/* The traceparent header as nginx parsed it: found in the request's header list by the
 * hash and length of its name, read only for requests kept as spans. Two of them make the
 * context invalid (W3C): none is taken then. */
static __always_inline void read_traceparent(struct scratch_space *sp, struct nginx_event *ev)
{
    ev->tp_len = 0;
#if HAVE_TRACEPARENT
    u64 elts = R_FIELD(sp, R_HEADERS + 8);
    u64 nelts = R_FIELD(sp, R_HEADERS + 16);
    if (!elts || !nelts || bpf_probe_read_user(sp->headers, sizeof(sp->headers), (void *)elts) != 0)
        return;
    int found = 0;
    for (int i = 0; i < TP_SCAN; i++) {
        if (i >= nelts)
            break;
        u8 *e = sp->headers + i * TE_SIZE;
        if (*(u64 *)(e + TE_HASH) != TRACEPARENT_HASH || *(u64 *)(e + TE_KEY) != 11)
            continue;
        if (found++) {
            ev->tp_len = 0;
            ev->flags &= ~F_TRACEPARENT;
            return;
        }
        u64 len = *(u64 *)(e + TE_VALUE);
        u64 data = *(u64 *)(e + TE_VALUE + 8);
        u32 m = clamp_len(len, TP_MAX - 1) & (TP_MAX - 1);
        if (data && m && bpf_probe_read_user(ev->traceparent, m, (void *)data) == 0) {
            ev->tp_len = m;
            ev->flags |= F_TRACEPARENT;
        }
    }
#endif
}

/* Whether the request carries a sampled parent (its traceparent's flags): for a request
 * the budget dropped, see keep_for_parent in common.h. */
static __always_inline int sampled_parent(struct scratch_space *sp, struct nginx_event *ev)
{
    read_traceparent(sp, ev);
    if (ev->tp_len != 55)
        return 0;
    u32 flags = hex_value(ev->traceparent[54]);
    return flags < 16 && (flags & 1);
}

static __always_inline void read_addresses(struct scratch_space *sp, struct nginx_event *ev)
{
#if HAVE_CLIENT
    u64 sa = C_FIELD(sp, C_SOCKADDR);
    if (sa && bpf_probe_read_user(ev->client, sizeof(ev->client), (void *)sa) == 0)
        ev->flags |= F_CLIENT;
#endif
#if HAVE_SERVER
    u64 local = C_FIELD(sp, C_LOCAL_SOCKADDR);
    u16 port_be = 0;
    if (local && bpf_probe_read_user(&port_be, sizeof(port_be), (void *)(local + 2)) == 0) {
        ev->server_port = (port_be >> 8) | ((port_be & 0xff) << 8);
        ev->flags |= F_SERVER;
    }
#endif
}

int on_request_end(struct pt_regs *ctx)
{
    if (!pid_selected())
        return 0;
    u64 end = bpf_ktime_get_ns();
    u64 r = PT_REGS_PARM1(ctx);
    s64 rc = (s64)PT_REGS_PARM2(ctx);
    int zero = 0;
    struct scratch_space *sp = scratch.lookup(&zero);
    if (!sp)
        return 0;
    struct nginx_event *ev = &sp->ev;
    int have_request = 0, have_connection = 0;
#if R_BLOCK > 0
    have_request = bpf_probe_read_user(sp->request, R_BLOCK, (void *)r) == 0;
#endif
#if HAVE_MAIN
    /* A subrequest is never freed on its own in nginx 1.x, so r->main is r: when it is
     * not, the offsets do not fit this build. Count it rather than emit wrong fields. */
    if (have_request && R_FIELD(sp, R_MAIN) != r) {
        stat_inc(STAT_UNMATCHED);
        return 0;
    }
#endif
#if C_BLOCK > 0
    u64 conn = have_request ? R_FIELD(sp, R_CONNECTION) : 0;
    have_connection = conn && bpf_probe_read_user(sp->connection, C_BLOCK, (void *)conn) == 0;
#endif

    struct req_key key = {};
    key.r = r;
    key.tgid = bpf_get_current_pid_tgid() >> 32;
    u64 start = 0;
    u64 *started = inflight.lookup(&key);
    if (started) {
        start = *started;
        inflight.delete(&key);
    }

    ev->flags = 0;
    ev->start_ns = start;
    ev->end_ns = end;
    ev->start_wall_ms = 0;
    ev->pid = key.tgid;
    ev->server_port = 0;
    ev->https = 0;
    ev->method = 0;
    ev->http_version = 0;
    ev->status = 0;
#if HAVE_STATUS
    if (have_request && have_connection) {
        ev->status = final_status(sp, rc);
        ev->flags |= F_STATUS;
    }
#endif

    u64 duration = end - start;
    if (!started) {
        /* Not a client request at all (no status), or no way to date it: drop. */
        if (ev->status == 0) {
            stat_inc(STAT_UNMATCHED);
            return 0;
        }
#if HAVE_NGX_START
        ev->start_wall_ms = R_FIELD(sp, R_START_SEC) * 1000 + R_FIELD(sp, R_START_MSEC);
        ev->flags |= F_NGX_START;
        u64 start_wall_ns = ev->start_wall_ms * 1000000ULL;
        u64 end_wall_ns = end + agent_const(CONST_WALL_MINUS_MONO_NS);
        duration = end_wall_ns > start_wall_ns ? end_wall_ns - start_wall_ns : 0;
#else
        stat_inc(STAT_UNMATCHED);
        return 0;
#endif
    }

    if (have_request) {
#if HAVE_METHOD
        ev->method = (u32)R_FIELD(sp, R_METHOD);
        ev->flags |= F_METHOD;
#endif
#if HAVE_VERSION
        ev->http_version = (u32)R_FIELD(sp, R_HTTP_VERSION);
        ev->flags |= F_VERSION;
#endif
    }
#if HAVE_SCHEME
    if (have_connection) {
        ev->https = C_FIELD(sp, C_SSL) != 0;
        ev->flags |= F_SCHEME;
    }
#endif

    hist_record(hist_dim(ev), duration);
    ev->tp_len = 0;
    if (!sample_keep(end, duration, ev->status >= 500)) {
        if (!(have_request && parents_recently(end) && sampled_parent(sp, ev) && keep_for_parent(end)))
            return 0;
    }

    if (have_connection)
        read_addresses(sp, ev);
    ev->ua_len = 0;
    ev->uri_len = 0;
    if (have_request) {
        read_strings(sp, ev);
        if (!(ev->flags & F_TRACEPARENT))
            read_traceparent(sp, ev);
    }
    u32 size = offsetof(struct nginx_event, data) + (ev->ua_len & (UA_MAX - 1)) + (ev->uri_len & (URI_MAX - 1));
    emit_record(ev, size);
    return 0;
}
