/* The metrics and health server (--metrics): GET /metrics in the Prometheus
 * text format and GET /healthz, over HTTP/1.1, by libmicrohttpd driven from
 * the loop: its epoll descriptor in an ev_io and its timeout in an ev_timer,
 * and every socket non-blocking, so no client can hold the loop. A client
 * that sends nothing, or a byte at a time, only holds its own connection;
 * connections (32 in all, 8 per address), the request (16 KiB) and idle
 * time (10 s) are bounded.
 *
 * It also measures how late the loop runs a timer due every 100 ms, the
 * loop's lag, which only it serves.
 *
 * Owned by the host. Owns on the loop the ev_io, the daemon's ev_timer and
 * the lag timer; wr_metrics_free stops them and closes every connection and
 * the listening socket. */
#ifndef WARREN_METRICS_H
#define WARREN_METRICS_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct wr_metrics wr_metrics;

/* What is served, asked for at each request. metrics returns a malloc'd
 * body (the server frees it) or NULL when out of memory; health writes a
 * one-line JSON object into json and returns whether the worker is healthy
 * (200) or not (503). */
typedef struct wr_metrics_source {
    char *(*metrics)(void *ud, size_t *len);
    bool (*health)(void *ud, char *json, size_t len);
    void *ud;
    struct wr_hist *lag; /* the server measures the loop's lag into it (stats.h) */
} wr_metrics_source;

/* Listens on host (a numeric IPv4 or IPv6 address; NULL or "" for every
 * interface) and port, and serves from the loop. Returns NULL with a
 * one-line reason in err when the address cannot be used. */
wr_metrics *wr_metrics_start(struct ev_loop *loop, const char *host, int port,
                             const wr_metrics_source *src, char *err, size_t errlen);

void wr_metrics_free(wr_metrics *m);

#endif
