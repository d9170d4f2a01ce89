/*
 * plain_consumer: the baseline warren is measured against. A hand-written rabbitmq-c consumer as
 * a careful C programmer would write it for a work queue: one connection, basic.qos with the given
 * prefetch, manual acks, one basic.ack per message right after it is consumed, and the library's
 * buffers recycled after each message.
 *
 *   plain_consumer --url URL --queue NAME --prefetch N --count N [--latency] [--no-ack]
 *
 * It exits once it has consumed and acked --count messages and prints
 *
 *   COUNT messages in SECONDS s: RATE msg/s, CPU_SECONDS s CPU
 *
 * timed from the first delivery to the last ack, so connecting does not count; the CPU time is
 * the whole process's, user and system. With --latency each
 * body is a send time (seconds since the epoch, as bench/publish_rate writes it) and it prints
 * instead
 *
 *   latency ms: p50 P50 p99 P99 max MAX (COUNT messages)
 *
 * With --no-ack it consumes without acks (and without a prefetch limit): the broker's own
 * ceiling for delivering to one consumer, which no consumer with acks can pass.
 *
 * Any failure prints one line on stderr and exits 1.
 */
#define _POSIX_C_SOURCE 200809L

#include "bench_amqp.h"

#include <sys/resource.h>
#include <time.h>

static double clock_seconds(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The value below which a fraction q of the sorted samples lie (nearest rank). */
static double percentile(const double *sorted, size_t n, double q) {
    size_t rank = (size_t)(q * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

int main(int argc, char **argv) {
    bench_name = "plain_consumer";
    const char *url = NULL, *queue = NULL;
    long prefetch = 1, count = -1;
    int latency = 0, no_ack = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--no-ack")) {
            no_ack = 1;
            continue;
        }
        if (!strcmp(a, "--latency")) {
            latency = 1;
            continue;
        }
        if (i + 1 >= argc) die("%s: unknown option or missing value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--url"))
            url = v;
        else if (!strcmp(a, "--queue"))
            queue = v;
        else if (!strcmp(a, "--prefetch"))
            prefetch = parse_long(a, v, 1, 65535);
        else if (!strcmp(a, "--count"))
            count = parse_long(a, v, 1, 1000000000L);
        else
            die("unknown option '%s'", a);
    }
    if (!url || !queue || count < 1)
        die("usage: plain_consumer --url URL --queue NAME --prefetch N --count N [--latency] "
            "[--no-ack]");

    amqp_connection_state_t conn = bench_connect(url);
    if (!no_ack) {
        amqp_basic_qos(conn, CHANNEL, 0, (uint16_t)prefetch, 0);
        check_reply(amqp_get_rpc_reply(conn), "basic.qos");
    }
    amqp_basic_consume(conn, CHANNEL, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, no_ack, 0,
                       amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume");

    double *lat = NULL;
    if (latency && !(lat = malloc((size_t)count * sizeof *lat))) die("out of memory");
    double first = 0;
    for (long n = 0; n < count; n++) {
        amqp_envelope_t env;
        amqp_rpc_reply_t r = amqp_consume_message(conn, &env, NULL, 0);
        check_reply(r, "consuming");
        if (n == 0) first = clock_seconds(CLOCK_MONOTONIC);
        if (lat) {
            /* The body is not NUL-terminated: copy the digits out before parsing. */
            char text[64];
            size_t len =
                env.message.body.len < sizeof text - 1 ? env.message.body.len : sizeof text - 1;
            memcpy(text, env.message.body.bytes, len);
            text[len] = '\0';
            lat[n] = clock_seconds(CLOCK_REALTIME) - strtod(text, NULL);
        }
        int rc = no_ack ? AMQP_STATUS_OK : amqp_basic_ack(conn, CHANNEL, env.delivery_tag, 0);
        if (rc != AMQP_STATUS_OK) die("basic.ack: %s", amqp_error_string2(rc));
        amqp_destroy_envelope(&env);
        amqp_maybe_release_buffers(conn);
    }
    double elapsed = clock_seconds(CLOCK_MONOTONIC) - first;

    /* Closing waits for close-ok, so every ack has reached the broker before we report. */
    check_reply(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS), "channel.close");
    check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS), "connection.close");
    amqp_destroy_connection(conn);

    if (lat) {
        qsort(lat, (size_t)count, sizeof *lat, cmp_double);
        printf("latency ms: p50 %.3f p99 %.3f max %.3f (%ld messages)\n",
               1e3 * percentile(lat, (size_t)count, 0.50),
               1e3 * percentile(lat, (size_t)count, 0.99), 1e3 * lat[count - 1], count);
        free(lat);
    } else {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                     (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
        printf("%ld messages in %.6f s: %.0f msg/s, %.3f s CPU\n", count, elapsed,
               elapsed > 0 ? (double)count / elapsed : 0.0, cpu);
    }
    return 0;
}
