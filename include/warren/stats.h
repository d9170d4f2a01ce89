/* What a worker counts for its metrics, and the Prometheus text format
 * (version 0.0.4) they are served in. Plain counters and histograms,
 * updated by the loop thread where things happen; no I/O here. */
#ifndef WARREN_STATS_H
#define WARREN_STATS_H

#include <stdbool.h>
#include <stddef.h>

/* Buckets of a histogram, upper bounds in seconds; +Inf is implied. */
#define WR_HIST_MAX 16

typedef struct wr_hist {
    const double *bounds;
    int nbounds;
    unsigned long long counts[WR_HIST_MAX]; /* per bucket, not cumulative */
    unsigned long long count;               /* all observations (+Inf) */
    double sum;
} wr_hist;

/* How each job ended, as warren_jobs_total's outcome label. */
typedef enum {
    WR_STAT_ACK,
    WR_STAT_REQUEUE,
    WR_STAT_REJECT,
    WR_STAT_RETRY,
    WR_STAT_INTERRUPTED,
    WR_STAT_OUTCOMES
} wr_stat_outcome;

/* What is counted per queue. */
typedef struct wr_queue_stats {
    const char *name;
    unsigned long long jobs[WR_STAT_OUTCOMES];
    unsigned long long job_errors; /* failed jobs: errors, timeouts, out of memory */
    wr_hist job_duration;
    unsigned long long deliveries[2]; /* [redelivered] */
    size_t in_flight;                 /* its messages the worker holds now (a gauge) */
} wr_queue_stats;

typedef struct wr_stats {
    wr_queue_stats *queues; /* one per queue, in the configuration's order */
    size_t nqueues;
    unsigned long long reconnects;
    unsigned long long reloads_ok, reloads_failed;
    unsigned long long publishes_ok, publishes_failed;
    unsigned long long spawns_ok, spawns_failed, spawns_error; /* error: could not start */
    unsigned long long http_ok, http_error, http_timeout, http_cancelled; /* warren.http */
    wr_hist loop_lag;
} wr_stats;

/* What is true now, read when the metrics are served. */
typedef struct wr_gauges {
    bool connected;
    bool quiet; /* SIGUSR1: consuming nothing on purpose */
    unsigned script_version;
    double start_time; /* process start, Unix seconds */
} wr_gauges;

/* Prepares the counters of the n queues named (the names must outlive s).
 * Returns 0, or -1 when out of memory. */
int wr_stats_init(wr_stats *s, const char *const *names, size_t n);

void wr_stats_free(wr_stats *s);

/* The outcome's label: "ack", "requeue", "reject", "retry", "interrupted". */
const char *wr_stat_outcome_name(wr_stat_outcome o);

void wr_hist_observe(wr_hist *h, double seconds);

/* Writes every metric, with the process metrics of this process, in the
 * text format. Returns a malloc'd string (the caller frees it) and its
 * length in *len, or NULL when out of memory. */
char *wr_stats_render(const wr_stats *s, const wr_gauges *g, size_t *len);

#endif
