/*
 * publish_rate: publishes persistent messages at a steady rate, for the latency benchmark. Each
 * body is the wall-clock send time in seconds since the epoch ("%.6f"), taken just before the
 * publish, so that the consumer, on the same machine, can tell how long the message took to reach
 * it.
 *
 *   publish_rate --url URL --queue NAME --rate PER_SECOND --count N
 *
 * Messages go out on an absolute schedule (one every 1/rate s from the start), so a late wake-up
 * does not slow the rate down. No publisher confirms: waiting for them would make the sender, not
 * the consumer, set the pace. Any failure prints one line on stderr and exits 1.
 */
#define _POSIX_C_SOURCE 200809L

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHANNEL 1

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("publish_rate: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void check_reply(amqp_rpc_reply_t r, const char *what) {
    if (r.reply_type == AMQP_RESPONSE_NORMAL) return;
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
        die("%s: %s", what, amqp_error_string2(r.library_error));
    die("%s: refused by the broker", what);
}

static long parse_long(const char *opt, const char *text, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < min || v > max)
        die("%s needs an integer in %ld..%ld, got '%s'", opt, min, max, text);
    return v;
}

int main(int argc, char **argv) {
    const char *url = NULL, *queue = NULL;
    long rate = 0, count = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--url"))
            url = v;
        else if (!strcmp(a, "--queue"))
            queue = v;
        else if (!strcmp(a, "--rate"))
            rate = parse_long(a, v, 1, 1000000);
        else if (!strcmp(a, "--count"))
            count = parse_long(a, v, 1, 1000000000L);
        else
            die("unknown option '%s'", a);
    }
    if (argc % 2 == 0 || !url || !queue || !rate || !count)
        die("usage: publish_rate --url URL --queue NAME --rate PER_SECOND --count N");

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

    amqp_basic_properties_t props;
    memset(&props, 0, sizeof props);
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = 2;
    amqp_bytes_t routing_key = amqp_cstring_bytes(queue);

    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    long step_ns = 1000000000L / rate;
    for (long n = 0; n < count; n++) {
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        char body[32];
        int len =
            snprintf(body, sizeof body, "%lld.%06ld", (long long)now.tv_sec, now.tv_nsec / 1000);
        amqp_bytes_t b = {(size_t)len, body};
        rc = amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, routing_key, 0, 0, &props, b);
        if (rc != AMQP_STATUS_OK) die("basic.publish: %s", amqp_error_string2(rc));
        next.tv_nsec += step_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
    }
    check_reply(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS), "channel.close");
    check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS), "connection.close");
    amqp_destroy_connection(conn);
    free(copy);
    return 0;
}
