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

#include "bench_amqp.h"

#include <time.h>

int main(int argc, char **argv) {
    bench_name = "publish_rate";
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

    amqp_connection_state_t conn = bench_connect(url);

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
        int rc = amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, routing_key, 0, 0, &props, b);
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
    return 0;
}
