/*
 * What the bench tools share: one-line fatal errors, option parsing, and a
 * plain blocking rabbitmq-c connection with channel 1 open. Each tool sets
 * bench_name before anything can fail.
 */
#ifndef WARREN_BENCH_AMQP_H
#define WARREN_BENCH_AMQP_H

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHANNEL 1

static const char *bench_name = "bench";

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", bench_name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void check_reply(amqp_rpc_reply_t r, const char *what) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        die("%s: %s", what, amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        die("%s: refused by the broker (method 0x%08x)", what, r.reply.id);
        break;
    default:
        die("%s: no reply", what);
    }
}

static long parse_long(const char *opt, const char *text, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < min || v > max)
        die("%s needs an integer in %ld..%ld, got '%s'", opt, min, max, text);
    return v;
}

/* Connects to url (an empty vhost meaning "/", as warren reads it), logs in
 * with warren's frame size and no heartbeat (the tools block in the
 * library), and opens CHANNEL. Dies on any failure. */
static amqp_connection_state_t bench_connect(const char *url) {
    char *copy = strdup(url);
    struct amqp_connection_info ci;
    if (!copy || amqp_parse_url(copy, &ci) != AMQP_STATUS_OK) die("cannot parse URL '%s'", url);
    if (!ci.vhost[0]) ci.vhost = "/";
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) die("cannot create a socket");
    int rc = amqp_socket_open(sock, ci.host, ci.port);
    if (rc != AMQP_STATUS_OK) die("connect %s:%d: %s", ci.host, ci.port, amqp_error_string2(rc));
    check_reply(
        amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password),
        "login");
    amqp_channel_open(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");
    free(copy);
    return conn;
}

#endif
