/* openloop: a constant-rate (open-loop, wrk2-style) HTTP/1.1 load generator.
 *
 * Request n of the run is due at t0 + n / rate, whatever the server does, and
 * goes out on keep-alive connection n % connections as soon as that connection
 * has fewer than PIPELINE requests in flight (-P 1, the default: wrk2's one at
 * a time; -P 0: no limit, every request is written when due, so the server sees
 * the offered rate itself, as it would from that many more clients). Latency
 * is counted from the due time, not from the send, so a server that falls
 * behind is charged for the wait its clients would see (no coordinated
 * omission). One thread, epoll, non-blocking sockets: a few microseconds per
 * request, so on a 2-core box the server, not this client, is what saturates.
 *
 *   openloop -h HOST -p PORT -r RATE -d SECONDS [-c CONNECTIONS] [-P PIPELINE]
 *            [-k KEYS] [-K PREFIX] [-o OFFSET] [-u PATH] [-H HEADER] [-t TIMEOUT] [-v]
 *
 * -k KEYS > 0: request n carries key PREFIX(OFFSET + n) % KEYS in header HEADER
 * (default X-API-Key), so KEYS distinct keys arrive; -k 0: one key, PREFIX.
 * After SECONDS no new request becomes due; the ones already due are still sent
 * and awaited for up to TIMEOUT seconds. A connection with requests in flight
 * and no answer for TIMEOUT seconds, a reset or a refused connection is an
 * error for each request in flight on it (the connection is reopened); what is
 * still unanswered at the end is counted apart. Prints one JSON object; its
 * write_late_ms is how late requests were handed to their connection's buffer (from
 * the due time): late when this client is short of CPU, or when that buffer is full
 * (OUT_MAX, after the server's receive window): the latencies it reports include that.
 *
 * -v: a line on stderr for each connection that timed out or broke with requests
 * in flight (when, which local port, how many, how long since its last answer).
 * Requests due in one pass of the loop go out in one send per connection at its end.
 *
 * Built by benchmarks/r6.py with `gcc -O2 -o openloop openloop.c`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF 65536
#define REQ_BUF 1024
#define OUT_MAX (1 << 20) /* bytes written ahead per connection before requests wait here */

enum { SERVED_200, SERVED_429, SHED_503, OTHER_STATUS, NCLASS };

typedef struct {
    int fd;
    int index;
    int connected;
    /* per-connection sequence numbers: done <= sent <= due */
    uint64_t due_j;    /* requests of this connection due so far */
    uint64_t sent_j;   /* written to the output buffer */
    uint64_t done_j;   /* answered, or lost with a broken connection */
    double progress_at; /* last answer, or when the connection went from idle to busy */
    char *out;
    size_t out_len, out_off, out_cap;
    int wants_out; /* EPOLLOUT is asked for (the socket's buffer was full) */
    int dirty;     /* requests were added to out: flush at the end of this loop pass */
    char buf[READ_BUF];
    size_t buf_len;
} conn_t;

typedef struct {
    uint32_t *v;
    size_t n, cap;
} samples_t;

static const char *host = "127.0.0.1", *path = "/v1/rate", *header = "X-API-Key";
static const char *prefix = "openloop-";
static int port = 8080, nconn = 256, pipeline = 1;
static double rate = 1000, seconds = 5, timeout_s = 10;
static uint64_t nkeys = 0, key_offset = 0;
static struct sockaddr_in addr;
static int ep;
static double t0;
static double now(void);
static conn_t *conns;
static conn_t **dirty; /* connections to flush at the end of this pass of the loop */
static int ndirty;
static samples_t lat[NCLASS];
/* how late this client itself was: from the due time to handing the request to its
 * connection (a client starved of CPU is late, and the latencies above include it) */
static samples_t write_late;
static uint64_t counts[NCLASS], sent, errors, timeouts, connects, connect_errors;
static double last_answer;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void add_sample(samples_t *s, double latency) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1 << 16;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) { perror("realloc"); exit(2); }
    }
    double us = latency * 1e6;
    s->v[s->n++] = us < 0 ? 0 : us > 4e9 ? 4000000000u : (uint32_t)us;
}

static void record(int cls, double latency) {
    add_sample(&lat[cls], latency);
    counts[cls]++;
}

static double due_time(const conn_t *c, uint64_t j) {
    return t0 + ((double)j * nconn + c->index) / rate;
}

static void open_conn(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->connected = 0;
    c->buf_len = 0;
    c->out_len = c->out_off = 0;
    c->wants_out = 1; /* EPOLLOUT tells when the connect completed */
    connects++;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        connect_errors++;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

/* Drop the connection (each request in flight on it is an error) and reopen it. */
static int verbose;

static void reopen(conn_t *c, int timed_out) {
    uint64_t lost = c->sent_j - c->done_j;
    if (verbose && lost) {
        struct sockaddr_in local;
        socklen_t len = sizeof local;
        getsockname(c->fd, (struct sockaddr *)&local, &len);
        fprintf(stderr, "openloop: t=%.3f conn %d (port %d) %s with %llu in flight, %zu bytes unsent, "
                "last answer %.3f s ago\n", now() - t0, c->index, ntohs(local.sin_port),
                timed_out ? "timed out" : "broke", (unsigned long long)lost, c->out_len - c->out_off,
                now() - c->progress_at);
    }
    errors += lost;
    if (timed_out) timeouts += lost;
    c->done_j = c->sent_j; /* lost; later requests are due on their own schedule */
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    open_conn(c);
}

static void want_write(conn_t *c, int on) {
    if (c->wants_out == on) return; /* one epoll_ctl per change, not one per write */
    c->wants_out = on;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void flush(conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) { want_write(c, 1); return; }
            reopen(c, 0);
            return;
        }
        c->out_off += (size_t)w;
    }
    c->out_len = c->out_off = 0;
    want_write(c, 0);
}

/* Write every request of this connection that is due, within the pipeline limit. */
static void maybe_send(conn_t *c, double t) {
    if (!c->connected) return;
    int wrote = 0;
    while (c->sent_j < c->due_j && (pipeline == 0 || c->sent_j - c->done_j < (uint64_t)pipeline) &&
           c->out_len < OUT_MAX) {
        if (c->out_cap - c->out_len < REQ_BUF) {
            c->out_cap = c->out_cap ? c->out_cap * 2 : 4 * REQ_BUF;
            c->out = realloc(c->out, c->out_cap);
            if (!c->out) { perror("realloc"); exit(2); }
        }
        uint64_t n = c->sent_j * (uint64_t)nconn + (uint64_t)c->index;
        char *at = c->out + c->out_len;
        int len;
        if (nkeys)
            len = snprintf(at, REQ_BUF, "GET %s HTTP/1.1\r\nHost: %s\r\n%s: %s%llu\r\n\r\n",
                           path, host, header, prefix,
                           (unsigned long long)((key_offset + n) % nkeys));
        else
            len = snprintf(at, REQ_BUF, "GET %s HTTP/1.1\r\nHost: %s\r\n%s: %s\r\n\r\n", path,
                           host, header, prefix);
        add_sample(&write_late, t - due_time(c, c->sent_j));
        if (c->sent_j == c->done_j) c->progress_at = t;
        c->out_len += (size_t)len;
        c->sent_j++;
        sent++;
        wrote = 1;
    }
    /* Written at the end of this pass of the loop, once for all that became due in it
     * (one send per connection per pass, not one per request: on loopback a send
     * carries the receiver's TCP work too, and the client's CPU, not the server's,
     * ran out at 3x). A busy pass batches more; an idle one sends at once. */
    if (wrote && c->out_off == 0 && !c->dirty) {
        c->dirty = 1;
        dirty[ndirty++] = c;
    }
}

static void flush_dirty(void) {
    for (int i = 0; i < ndirty; i++) {
        conn_t *c = dirty[i];
        c->dirty = 0;
        if (c->connected && c->out_off == 0 && c->out_len) flush(c);
    }
    ndirty = 0;
}

/* Parse complete responses out of the read buffer; returns -1 on a framing error, 1 after
 * an answer with Connection: close. The parsed responses are dropped from the front of the
 * buffer once, at the end: one memmove per read, not one per response (with a 64 KiB
 * buffer of 300-byte answers that was ~100 bytes moved per byte read, and a client that
 * fell behind read full buffers, fell further behind, and measured its own queue). */
static int parse_at(conn_t *c, double t, size_t *used_out);

static int parse(conn_t *c, double t) {
    size_t used = 0;
    int result = parse_at(c, t, &used);
    if (used) {
        memmove(c->buf, c->buf + used, c->buf_len - used);
        c->buf_len -= used;
    }
    return result;
}

static int parse_at(conn_t *c, double t, size_t *used_out) {
    size_t off = 0;
    for (;;) {
        *used_out = off;
        char *buf = c->buf + off;
        size_t buf_len = c->buf_len - off;
        if (buf_len < 12) return 0;
        char *end = memmem(buf, buf_len, "\r\n\r\n", 4);
        if (!end) return buf_len == READ_BUF ? -1 : 0;
        size_t head = (size_t)(end - buf) + 4;
        if (memcmp(buf, "HTTP/1.", 7) != 0) return -1;
        int status = atoi(buf + 9);
        long length = -1;
        int close_after = 0;
        for (char *line = memchr(buf, '\n', head); line && line < end;
             line = memchr(line + 1, '\n', (size_t)(end - line))) {
            char *l = line + 1;
            if (strncasecmp(l, "content-length:", 15) == 0) length = strtol(l + 15, NULL, 10);
            else if (strncasecmp(l, "connection:", 11) == 0 && strncasecmp(l + 11, " close", 6) == 0)
                close_after = 1;
            else if (strncasecmp(l, "transfer-encoding:", 18) == 0) return -1;
        }
        if (length < 0) return -1;
        if (buf_len < head + (size_t)length) {
            return head + (size_t)length > READ_BUF ? -1 : 0;
        }
        if (c->done_j == c->sent_j) return -1; /* an answer nobody asked for */
        int cls = status == 200 ? SERVED_200 : status == 429 ? SERVED_429
                  : status == 503 ? SHED_503 : OTHER_STATUS;
        record(cls, t - due_time(c, c->done_j));
        last_answer = t;
        c->progress_at = t;
        c->done_j++;
        off += head + (size_t)length;
        *used_out = off;
        if (close_after) return 1;
    }
}

static void on_event(conn_t *c, uint32_t events, double t) {
    if (!c->connected) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            connect_errors++;
            reopen(c, 0);
            return;
        }
        c->connected = 1;
        want_write(c, 0);
        maybe_send(c, t);
        return;
    }
    if (events & EPOLLOUT) {
        flush(c);
        if (!c->connected) return; /* the write failed: reopened */
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        for (;;) {
            ssize_t r = recv(c->fd, c->buf + c->buf_len, READ_BUF - c->buf_len, 0);
            if (r > 0) {
                c->buf_len += (size_t)r;
                int p = parse(c, t);
                if (p < 0) { reopen(c, 0); return; }
                if (p > 0) { reopen(c, 0); return; }
                if (c->buf_len == READ_BUF) { reopen(c, 0); return; }
                continue;
            }
            if (r < 0 && errno == EAGAIN) break;
            reopen(c, 0); /* closed or reset */
            return;
        }
    }
    maybe_send(c, t);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(samples_t *s, double p) {
    if (!s->n) return -1;
    size_t i = (size_t)(p / 100.0 * (double)(s->n - 1) + 0.5);
    return s->v[i] / 1000.0;
}

static void usage(void) {
    fprintf(stderr, "usage: openloop -h HOST -p PORT -r RATE -d SECONDS [-c CONNECTIONS] "
                    "[-P PIPELINE] [-k KEYS] [-K PREFIX] [-o OFFSET] [-u PATH] [-H HEADER] [-t TIMEOUT] "
                    "[-v]\n");
    exit(2);
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "h:p:r:d:c:P:k:K:o:u:H:t:v")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 'P': pipeline = atoi(optarg); break;
        case 'k': nkeys = strtoull(optarg, NULL, 10); break;
        case 'K': prefix = optarg; break;
        case 'o': key_offset = strtoull(optarg, NULL, 10); break;
        case 'u': path = optarg; break;
        case 'H': header = optarg; break;
        case 't': timeout_s = atof(optarg); break;
        case 'v': verbose = 1; break;
        default: usage();
        }
    }
    if (rate <= 0 || seconds <= 0 || nconn <= 0 || port <= 0 || timeout_s <= 0 || pipeline < 0)
        usage();
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) usage();
    ep = epoll_create1(0);
    conns = calloc((size_t)nconn, sizeof *conns);
    dirty = calloc((size_t)nconn, sizeof *dirty);
    if (!conns || !dirty) { perror("calloc"); return 2; }
    for (int i = 0; i < nconn; i++) {
        conns[i].index = i;
        open_conn(&conns[i]);
    }
    /* connect everything before the clock starts */
    struct epoll_event events[512];
    double ready_by = now() + 5;
    for (int up = 0; up < nconn && now() < ready_by;) {
        int n = epoll_wait(ep, events, 512, 10);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->connected) continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) { connect_errors++; reopen(c, 0); continue; }
            c->connected = 1;
            want_write(c, 0);
            up++;
        }
    }
    t0 = now();
    double stop_due = t0 + seconds;
    uint64_t total = (uint64_t)(rate * seconds + 0.5), released = 0;
    double drain_until = stop_due + timeout_s, next_scan = t0;
    for (;;) {
        double t = now();
        /* release every request due by now to its connection */
        while (released < total && t0 + (double)released / rate <= t) {
            conn_t *c = &conns[released % (uint64_t)nconn];
            c->due_j++;
            released++;
            maybe_send(c, t);
        }
        flush_dirty();
        if (t >= next_scan) { /* timeouts, and whether anything is left, every 10 ms */
            next_scan = t + 0.01;
            int outstanding = 0;
            for (int i = 0; i < nconn; i++) {
                conn_t *c = &conns[i];
                if (c->sent_j > c->done_j && t - c->progress_at > timeout_s) reopen(c, 1);
                if (c->done_j < c->due_j) outstanding = 1;
            }
            if (released == total && !outstanding) break;
            if (t > drain_until) break;
        }
        int wait_ms = 1;
        int n = epoll_wait(ep, events, 512, wait_ms);
        t = now();
        for (int i = 0; i < n; i++) on_event(events[i].data.ptr, events[i].events, t);
        flush_dirty();
    }
    uint64_t unanswered = 0;
    for (int i = 0; i < nconn; i++) unanswered += conns[i].due_j - conns[i].done_j;
    for (int k = 0; k < NCLASS; k++) qsort(lat[k].v, lat[k].n, sizeof *lat[k].v, cmp_u32);
    qsort(write_late.v, write_late.n, sizeof *write_late.v, cmp_u32);
    /* served = 200 + 429: merge their samples for the served percentiles */
    samples_t served = {0};
    served.n = lat[SERVED_200].n + lat[SERVED_429].n;
    served.v = malloc((served.n + 1) * sizeof *served.v);
    memcpy(served.v, lat[SERVED_200].v, lat[SERVED_200].n * sizeof *served.v);
    memcpy(served.v + lat[SERVED_200].n, lat[SERVED_429].v, lat[SERVED_429].n * sizeof *served.v);
    qsort(served.v, served.n, sizeof *served.v, cmp_u32);
    printf("{\"offered\": %llu, \"sent\": %llu, \"ok\": %llu, \"denied\": %llu, \"shed\": %llu, "
           "\"other_status\": %llu, \"errors\": %llu, \"timeouts\": %llu, \"unanswered\": %llu, "
           "\"connects\": %llu, \"connect_errors\": %llu, \"seconds\": %.3f, "
           "\"span_s\": %.3f, \"served_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
           "\"p999\": %.3f, \"max\": %.3f}, \"shed_ms\": {\"p50\": %.3f, \"p99\": %.3f, "
           "\"max\": %.3f}, \"write_late_ms\": {\"p50\": %.3f, \"p99\": %.3f, \"max\": %.3f}}\n",
           (unsigned long long)total, (unsigned long long)sent,
           (unsigned long long)counts[SERVED_200], (unsigned long long)counts[SERVED_429],
           (unsigned long long)counts[SHED_503], (unsigned long long)counts[OTHER_STATUS],
           (unsigned long long)errors, (unsigned long long)timeouts,
           (unsigned long long)unanswered, (unsigned long long)connects,
           (unsigned long long)connect_errors, seconds, (last_answer > 0 ? last_answer : now()) - t0,
           pct(&served, 50), pct(&served, 90), pct(&served, 99), pct(&served, 99.9),
           pct(&served, 100), pct(&lat[SHED_503], 50), pct(&lat[SHED_503], 99),
           pct(&lat[SHED_503], 100), pct(&write_late, 50), pct(&write_late, 99),
           pct(&write_late, 100));
    return 0;
}
