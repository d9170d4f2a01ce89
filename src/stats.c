#include "warren/stats.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/* From a fast job to the default --job-timeout. */
static const double job_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                    2.5,   5,    10,    30,   60,  300,  1500};
/* From a loop that keeps up to one held for seconds. */
static const double lag_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1,   0.25,   0.5,   1,    2.5,   5};

static const char *const outcomes[WR_STAT_OUTCOMES] = {"ack", "requeue", "reject", "retry",
                                                       "interrupted"};

const char *wr_stat_outcome_name(wr_stat_outcome o) {
    return outcomes[o];
}

static void hist_init(wr_hist *h, const double *bounds, size_t n) {
    h->bounds = bounds;
    h->nbounds = (int)n;
}

int wr_stats_init(wr_stats *s, const char *const *names, size_t n) {
    memset(s, 0, sizeof *s);
    hist_init(&s->loop_lag, lag_bounds, sizeof lag_bounds / sizeof lag_bounds[0]);
    if (n && !(s->queues = calloc(n, sizeof *s->queues))) return -1;
    s->nqueues = n;
    for (size_t i = 0; i < n; i++) {
        s->queues[i].name = names[i];
        hist_init(&s->queues[i].job_duration, job_bounds, sizeof job_bounds / sizeof job_bounds[0]);
    }
    return 0;
}

void wr_stats_free(wr_stats *s) {
    free(s->queues);
    s->queues = NULL;
    s->nqueues = 0;
}

void wr_hist_observe(wr_hist *h, double seconds) {
    if (seconds < 0) seconds = 0;
    h->count++;
    h->sum += seconds;
    for (int i = 0; i < h->nbounds; i++)
        if (seconds <= h->bounds[i]) {
            h->counts[i]++;
            return;
        }
}

/* A growing buffer; a failed allocation makes every later append a no-op. */
typedef struct out {
    char *buf;
    size_t len, cap;
    bool failed;
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out *o, const char *fmt, ...) {
    if (o->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = true;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = (o->cap + (size_t)n + 1) * 2;
        char *grown = realloc(o->buf, cap);
        if (!grown) {
            o->failed = true;
            return;
        }
        o->buf = grown;
        o->cap = cap;
    }
}

/* queue="Q" with backslash, quote and newline escaped, into buf. */
static void queue_label(char *buf, size_t n, const char *queue) {
    size_t o = snprintf(buf, n, "queue=\"");
    for (; *queue && o + 4 < n; queue++) {
        if (*queue == '\\' || *queue == '"' || *queue == '\n') buf[o++] = '\\';
        buf[o++] = *queue == '\n' ? 'n' : *queue;
    }
    snprintf(buf + o, n - o, "\"");
}

static void help(out *o, const char *name, const char *type, const char *text) {
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, type);
}

/* A histogram with the given labels ("" for none). */
static void put_hist(out *o, const char *name, const char *labels, const wr_hist *h) {
    const char *sep = *labels ? "," : "";
    unsigned long long cumulative = 0;
    for (int i = 0; i < h->nbounds; i++) {
        cumulative += h->counts[i];
        put(o, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, h->bounds[i], cumulative);
    }
    put(o, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, h->count);
    if (*labels) {
        put(o, "%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, labels, h->sum, name, labels,
            h->count);
    } else {
        put(o, "%s_sum %.6f\n%s_count %llu\n", name, h->sum, name, h->count);
    }
}

/* Resident set size, open descriptors and CPU seconds of this process. */
static void put_process(out *o, double start_time) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        fclose(f);
    }
    int fds = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        for (struct dirent *e; (e = readdir(d));)
            if (e->d_name[0] != '.') fds++;
        closedir(d);
        fds--; /* the directory itself, opened to count them */
    }
    struct rusage ru;
    double cpu = 0;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
              ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
    help(o, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    put(o, "process_resident_memory_bytes %ld\n", resident * sysconf(_SC_PAGESIZE));
    help(o, "process_cpu_seconds_total", "counter", "Total user and system CPU time in seconds.");
    put(o, "process_cpu_seconds_total %.3f\n", cpu);
    help(o, "process_open_fds", "gauge", "Number of open file descriptors.");
    put(o, "process_open_fds %d\n", fds);
    help(o, "process_start_time_seconds", "gauge",
         "Start time of the process since the Unix epoch in seconds.");
    put(o, "process_start_time_seconds %.3f\n", start_time);
}

/* The label of each queue, escaped: queue="..." (a name is at most 255
 * bytes, each escaped to two at most). */
typedef char queue_label_buf[1100];

char *wr_stats_render(const wr_stats *s, const wr_gauges *g, size_t *len) {
    out o = {0};
    size_t nq = s->nqueues;
    queue_label_buf *q = calloc(nq ? nq : 1, sizeof *q);
    if (!q) return NULL;
    for (size_t i = 0; i < nq; i++)
        queue_label(q[i], sizeof q[i], s->queues[i].name);
    const wr_queue_stats *qs = s->queues;
    help(&o, "warren_jobs_total", "counter", "Jobs ended, by what became of their message.");
    for (size_t i = 0; i < nq; i++)
        for (int k = 0; k < WR_STAT_OUTCOMES; k++)
            put(&o, "warren_jobs_total{%s,outcome=\"%s\"} %llu\n", q[i], outcomes[k],
                qs[i].jobs[k]);
    help(&o, "warren_job_errors_total", "counter",
         "Jobs that failed: an error, a timeout or out of memory.");
    for (size_t i = 0; i < nq; i++)
        put(&o, "warren_job_errors_total{%s} %llu\n", q[i], qs[i].job_errors);
    help(&o, "warren_job_duration_seconds", "histogram", "How long jobs ran.");
    for (size_t i = 0; i < nq; i++)
        put_hist(&o, "warren_job_duration_seconds", q[i], &qs[i].job_duration);
    help(&o, "warren_jobs_in_flight", "gauge", "Messages being worked on now.");
    for (size_t i = 0; i < nq; i++)
        put(&o, "warren_jobs_in_flight{%s} %zu\n", q[i], qs[i].in_flight);
    help(&o, "warren_deliveries_total", "counter", "Messages the broker delivered.");
    for (size_t i = 0; i < nq; i++) {
        put(&o, "warren_deliveries_total{%s,redelivered=\"false\"} %llu\n", q[i],
            qs[i].deliveries[0]);
        put(&o, "warren_deliveries_total{%s,redelivered=\"true\"} %llu\n", q[i],
            qs[i].deliveries[1]);
    }
    free(q);
    help(&o, "warren_connected", "gauge", "1 while connected to the broker.");
    put(&o, "warren_connected %d\n", g->connected ? 1 : 0);
    help(&o, "warren_quiet", "gauge", "1 in the quiet stage (SIGUSR1): connected, taking no work.");
    put(&o, "warren_quiet %d\n", g->quiet ? 1 : 0);
    help(&o, "warren_reconnects_total", "counter", "Connections made again after a loss.");
    put(&o, "warren_reconnects_total %llu\n", s->reconnects);
    help(&o, "warren_reloads_total", "counter", "Script reloads, by result.");
    put(&o, "warren_reloads_total{result=\"ok\"} %llu\n", s->reloads_ok);
    put(&o, "warren_reloads_total{result=\"failed\"} %llu\n", s->reloads_failed);
    help(&o, "warren_script_version", "gauge", "The script version new messages go to.");
    put(&o, "warren_script_version %u\n", g->script_version);
    help(&o, "warren_publishes_total", "counter",
         "Messages scripts published (publish, reply, retry), by the broker's answer.");
    put(&o, "warren_publishes_total{result=\"ok\"} %llu\n", s->publishes_ok);
    put(&o, "warren_publishes_total{result=\"failed\"} %llu\n", s->publishes_failed);
    help(&o, "warren_spawns_total", "counter",
         "Programs scripts ran: ok (exit 0), failed, or error (could not start).");
    put(&o, "warren_spawns_total{result=\"ok\"} %llu\n", s->spawns_ok);
    put(&o, "warren_spawns_total{result=\"failed\"} %llu\n", s->spawns_failed);
    put(&o, "warren_spawns_total{result=\"error\"} %llu\n", s->spawns_error);
    help(&o, "warren_http_requests_total", "counter",
         "HTTP requests scripts made (warren.http): ok (a response, whatever its status), error, "
         "timeout, or cancelled with their job.");
    put(&o, "warren_http_requests_total{result=\"ok\"} %llu\n", s->http_ok);
    put(&o, "warren_http_requests_total{result=\"error\"} %llu\n", s->http_error);
    put(&o, "warren_http_requests_total{result=\"timeout\"} %llu\n", s->http_timeout);
    put(&o, "warren_http_requests_total{result=\"cancelled\"} %llu\n", s->http_cancelled);
    help(&o, "warren_loop_lag_seconds", "histogram",
         "How late the event loop ran its timers; anything that holds the loop shows here.");
    put_hist(&o, "warren_loop_lag_seconds", "", &s->loop_lag);
    put_process(&o, g->start_time);
    if (o.failed) {
        free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}
