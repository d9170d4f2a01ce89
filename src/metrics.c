#include "warren/metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "warren/dl.h"
#include "warren/log.h"
#include "warren/stats.h"

#define MAX_CONNECTIONS 32
#define MAX_PER_ADDRESS 8
#define REQUEST_MEMORY (16 * 1024)
#define IDLE_SECONDS 10
/* Seconds between two measurements of the loop's lag. */
#define LAG_INTERVAL 0.1

/* libmicrohttpd, loaded when a server starts: linked in, it and the TLS
 * libraries it brings (GnuTLS and its own) cost every worker about 3 MiB of
 * resident memory, --metrics or not. */
#define MHD_LIBRARY "libmicrohttpd.so.12"
static struct {
    void *lib;
    struct MHD_Daemon *(*start_daemon)(unsigned int, uint16_t, MHD_AcceptPolicyCallback, void *,
                                       MHD_AccessHandlerCallback, void *, ...);
    const union MHD_DaemonInfo *(*get_daemon_info)(struct MHD_Daemon *, enum MHD_DaemonInfoType,
                                                   ...);
    enum MHD_Result (*run)(struct MHD_Daemon *);
    enum MHD_Result (*get_timeout)(struct MHD_Daemon *, MHD_UNSIGNED_LONG_LONG *);
    void (*stop_daemon)(struct MHD_Daemon *);
    struct MHD_Response *(*create_response_from_buffer)(size_t, void *,
                                                        enum MHD_ResponseMemoryMode);
    enum MHD_Result (*add_response_header)(struct MHD_Response *, const char *, const char *);
    enum MHD_Result (*queue_response)(struct MHD_Connection *, unsigned int, struct MHD_Response *);
    void (*destroy_response)(struct MHD_Response *);
} mhd;

/* Loads the library once. Returns 0, or -1 with err. */
static int load_mhd(char *err, size_t errlen) {
    if (mhd.lib) return 0;
    const wr_dl_sym syms[] = {
        {&mhd.start_daemon, "MHD_start_daemon"},
        {&mhd.get_daemon_info, "MHD_get_daemon_info"},
        {&mhd.run, "MHD_run"},
        {&mhd.get_timeout, "MHD_get_timeout"},
        {&mhd.stop_daemon, "MHD_stop_daemon"},
        {&mhd.create_response_from_buffer, "MHD_create_response_from_buffer"},
        {&mhd.add_response_header, "MHD_add_response_header"},
        {&mhd.queue_response, "MHD_queue_response"},
        {&mhd.destroy_response, "MHD_destroy_response"},
    };
    mhd.lib = wr_dl_open(MHD_LIBRARY, "--metrics", "libmicrohttpd12", syms,
                         sizeof syms / sizeof syms[0], err, errlen);
    return mhd.lib ? 0 : -1;
}

struct wr_metrics {
    struct ev_loop *loop;
    struct MHD_Daemon *daemon;
    wr_metrics_source src;
    ev_io io;       /* the daemon's epoll descriptor */
    ev_timer timer; /* the daemon's own timeout (idle connections) */
    ev_timer lag;   /* due every LAG_INTERVAL: how late it runs is the loop's lag */
    double lag_due; /* ev_time() at which it should fire */
};

/* Lets the daemon work, then waits for what it asks for next. */
static void pump(wr_metrics *m) {
    mhd.run(m->daemon);
    MHD_UNSIGNED_LONG_LONG ms;
    ev_timer_stop(m->loop, &m->timer);
    if (mhd.get_timeout(m->daemon, &ms) == MHD_YES) {
        ev_timer_set(&m->timer, (double)ms / 1000.0, 0);
        ev_timer_start(m->loop, &m->timer);
    }
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)loop, (void)revents;
    pump(w->data);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    pump(w->data);
}

/* How late the loop ran the lag timer; then the next one. */
static void lag_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)revents;
    wr_metrics *m = w->data;
    wr_hist_observe(m->src.lag, ev_time() - m->lag_due);
    ev_now_update(loop);
    m->lag_due = ev_time() + LAG_INTERVAL;
    ev_timer_set(w, LAG_INTERVAL, 0);
    ev_timer_start(loop, w);
}

static void log_cb(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char line[256];
    vsnprintf(line, sizeof line, fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    wr_debug("metrics server: %s", line);
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *type,
                             char *body, size_t len, enum MHD_ResponseMemoryMode mode) {
    struct MHD_Response *r = mhd.create_response_from_buffer(len, body, mode);
    if (!r) {
        if (mode == MHD_RESPMEM_MUST_FREE) free(body);
        return MHD_NO; /* out of memory: the connection is closed */
    }
    mhd.add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    mhd.add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    enum MHD_Result rc = mhd.queue_response(c, status, r);
    mhd.destroy_response(r);
    return rc;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *upload_data,
                              size_t *upload_data_size, void **con_cls) {
    (void)version, (void)upload_data, (void)upload_data_size, (void)con_cls;
    wr_metrics *m = cls;
    static char not_found[] = "not found: try /metrics or /healthz\n";
    static char not_allowed[] = "only GET and HEAD\n";
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", not_allowed,
                     sizeof not_allowed - 1, MHD_RESPMEM_PERSISTENT);
    if (strcmp(url, "/metrics") == 0) {
        size_t len;
        char *body = m->src.metrics(m->src.ud, &len);
        if (!body) return MHD_NO;
        return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len,
                     MHD_RESPMEM_MUST_FREE);
    }
    if (strcmp(url, "/healthz") == 0) {
        char json[512];
        bool ok = m->src.health(m->src.ud, json, sizeof json - 1);
        strcat(json, "\n");
        return reply(c, ok ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, "application/json", json,
                     strlen(json), MHD_RESPMEM_MUST_COPY);
    }
    return reply(c, MHD_HTTP_NOT_FOUND, "text/plain", not_found, sizeof not_found - 1,
                 MHD_RESPMEM_PERSISTENT);
}

/* A non-blocking listening socket on host:port, or -1 with err. */
static int listen_on(const char *host, int port, char *err, size_t errlen) {
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV,
                             .ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM},
                    *res = NULL;
    char service[8];
    snprintf(service, sizeof service, "%d", port);
    if (host && !*host) host = NULL;
    if (!host) hints.ai_family = AF_INET6; /* with IPv4 mapped in: every interface of both */
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0 && !host) {
        hints.ai_family = AF_INET;
        rc = getaddrinfo(NULL, service, &hints, &res);
    }
    if (rc != 0) {
        snprintf(err, errlen, "--metrics: cannot use address '%s': %s", host ? host : "",
                 gai_strerror(rc));
        return -1;
    }
    int fd = -1, error = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            error = errno;
            continue;
        }
        int one = 1, zero = 0;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (a->ai_family == AF_INET6 && !host)
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
            error = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, errlen, "--metrics: cannot listen on %s%s%d: %s", host ? host : "",
                 host ? ":" : "port ", port, strerror(error));
    return fd;
}

wr_metrics *wr_metrics_start(struct ev_loop *loop, const char *host, int port,
                             const wr_metrics_source *src, char *err, size_t errlen) {
    if (load_mhd(err, errlen)) return NULL;
    int fd = listen_on(host, port, err, errlen);
    if (fd < 0) return NULL;
    wr_metrics *m = calloc(1, sizeof *m);
    if (!m) {
        close(fd);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    m->loop = loop;
    m->src = *src;
    /* No thread of its own: the loop drives it through its epoll descriptor. */
    m->daemon = mhd.start_daemon(MHD_USE_EPOLL, 0, NULL, NULL, handle, m, MHD_OPTION_LISTEN_SOCKET,
                                 fd, MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS,
                                 MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)MAX_PER_ADDRESS,
                                 MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)REQUEST_MEMORY,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IDLE_SECONDS,
                                 MHD_OPTION_EXTERNAL_LOGGER, log_cb, NULL, MHD_OPTION_END);
    const union MHD_DaemonInfo *info =
        m->daemon ? mhd.get_daemon_info(m->daemon, MHD_DAEMON_INFO_EPOLL_FD) : NULL;
    if (!info) {
        if (m->daemon) mhd.stop_daemon(m->daemon);
        close(fd);
        free(m);
        snprintf(err, errlen, "--metrics: the HTTP server did not start");
        return NULL;
    }
    ev_io_init(&m->io, io_cb, info->epoll_fd, EV_READ);
    ev_timer_init(&m->timer, timer_cb, 0, 0);
    ev_timer_init(&m->lag, lag_cb, LAG_INTERVAL, 0);
    m->io.data = m->timer.data = m->lag.data = m;
    ev_io_start(loop, &m->io);
    ev_now_update(loop);
    m->lag_due = ev_time() + LAG_INTERVAL;
    ev_timer_start(loop, &m->lag);
    pump(m);
    return m;
}

void wr_metrics_free(wr_metrics *m) {
    if (!m) return;
    ev_io_stop(m->loop, &m->io);
    ev_timer_stop(m->loop, &m->timer);
    ev_timer_stop(m->loop, &m->lag);
    mhd.stop_daemon(m->daemon); /* closes the listening socket too */
    free(m);
}
