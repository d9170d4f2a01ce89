#include "warren/host.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/broker.h"
#include "warren/dial.h"
#include "warren/job.h"
#include "warren/load.h"
#include "warren/log.h"
#include "warren/metrics.h"
#include "warren/notify.h"
#include "warren/reload.h"
#include "warren/report.h"
#include "warren/retry.h"
#include "warren/http.h"
#include "warren/spawn.h"
#include "warren/stats.h"

#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 30.0
#define CLOSE_TIMEOUT 2.0
/* --until-empty: seconds before asking again about messages that were left. */
#define EMPTY_RECHECK 0.5

typedef enum { CONNECTING, RUNNING, DRAINING, CLOSING, STOPPED } host_state;

/* What the host knows of one queue; its messages held now are its
 * stats' in_flight. */
typedef struct hqueue {
    bool consuming; /* false after a broker-initiated cancel, and while quiet */
} hqueue;

typedef struct host {
    const wr_config *cfg;
    struct ev_loop *loop;
    wr_broker *broker;
    wr_sched *sched;
    wr_retrier *retrier;   /* failed jobs' messages waiting for their retry copy's confirm */
    wr_reloader *reloader; /* the current version; jobs pin their own */
    wr_ctx ctx;            /* what the scripts may use */
    wr_notify *notify;     /* the service manager */
    hqueue *queues;        /* one per queue of cfg */
    char *names;           /* "'a', 'b'": the queues, for the log and STATUS= */
    char status[512];      /* the STATUS= it was last sent */
    ev_timer status_timer; /* sends a changed STATUS= once a second */
    wr_stats stats;        /* what /metrics serves */
    wr_metrics *metrics;   /* --metrics, or NULL */
    wr_report *report;     /* --report, or NULL */
    double start_time;     /* Unix seconds */
    host_state state;
    int exit_code;
    bool ever_connected;
    bool quiet;            /* SIGUSR1: no new work until SIGUSR2 */
    unsigned interrupted;  /* jobs cut off by the forced stage or a lost connection */
    unsigned long done;    /* jobs ended, whatever their outcome */
    unsigned long started; /* jobs started, for --max-jobs */
    size_t depth_asked;    /* --until-empty: queues whose depth question is out */
    bool depth_left;       /* a queue answered that messages are left */
    ev_timer empty_timer;  /* --until-empty: asks again when messages were left */
    bool forcing;          /* the count hook began the forced stage (see urgent) */
    unsigned forced_from;  /* interrupted when it did */
    ev_tstamp outage_since;
    unsigned attempts;
    double backoff;
    ev_signal sigint, sigterm, sighup, sigquiet, sigresume;
    ev_timer drain_timer;
    ev_tstamp drain_deadline; /* wall clock, for the count hook (see urgent) */
    ev_timer retry_timer;     /* reconnect, or re-consume after a cancel */
    ev_timer stop_timer;      /* ends a clean drain from the loop's top level */
} host;

/* Messages not settled yet: running jobs, and failed ones whose retry copy
 * awaits its confirm. Both hold delivery tags of their queue's channel. */
static size_t in_flight(const host *h) {
    return wr_sched_running(h->sched) + wr_retrier_pending(h->retrier);
}

/* The messages of queue q not settled yet. */
static size_t held(const host *h, size_t q) {
    return h->stats.queues[q].in_flight;
}

/* Whether every queue is being consumed. */
static bool all_consuming(const host *h) {
    for (size_t q = 0; q < h->cfg->nqueues; q++)
        if (!h->queues[q].consuming) return false;
    return true;
}

/* A message of a job is settled (or handed back): the host lets go of it. */
static void let_go(host *h, wr_delivery *d) {
    h->stats.queues[d->qi].in_flight--;
    wr_broker_release(h->broker, d);
}

/* Tells the service manager the state, when it changed: "consuming 'q': 2
 * jobs in flight, 40 done"; extra ("READY=1") goes with it, changed or not. */
/* The state in a word or three, for STATUS= and /healthz. */
static const char *state_name(const host *h) {
    switch (h->state) {
    case CONNECTING:
        return h->ever_connected ? "reconnecting" : "connecting";
    case RUNNING:
        return h->quiet              ? "quiet"
               : all_consuming(h)    ? "consuming"
               : h->cfg->nqueues > 1 ? "waiting for a queue"
                                     : "waiting for the queue";
    case DRAINING:
        return "draining";
    default:
        return "closing";
    }
}

static void send_status(host *h, const char *extra) {
    if (!wr_notify_enabled(h->notify)) return;
    char now[sizeof h->status];
    size_t n = in_flight(h);
    snprintf(now, sizeof now, "%s %s: %zu job%s in flight, %lu done", state_name(h), h->names, n,
             wr_plural(n), h->done);
    if (!extra && strcmp(now, h->status) == 0) return;
    memcpy(h->status, now, sizeof now);
    wr_notify_send(h->notify, "%s%sSTATUS=%s", extra ? extra : "", extra ? "\n" : "", now);
}

static void status_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    send_status(w->data, NULL);
}

/* The exit code is decided once, by the first stage that stops the worker:
 * a signal handled later in the same loop turn cannot change it. */
static void stop(host *h, int code) {
    if (h->state == STOPPED) return;
    h->state = STOPPED;
    h->exit_code = code;
    ev_break(h->loop, EVBREAK_ALL);
}

static void drain(host *h, const char *what);
static void check_empty(host *h);

/* The next wait before a retry: doubling, capped, with jitter so that a
 * fleet of workers does not reconnect in step. */
static double next_backoff(host *h) {
    double b = h->backoff;
    h->backoff = b * 2 > BACKOFF_MAX ? BACKOFF_MAX : b * 2;
    return b * (0.5 + 0.5 * ((double)rand() / RAND_MAX));
}

static void schedule_retry(host *h) {
    double wait = next_backoff(h);
    /* At start-up, never wait past --connect-timeout: the last attempt
     * gets what is left and its failure ends the wait in time. */
    if (h->state == CONNECTING && !h->ever_connected && h->cfg->connect_timeout > 0) {
        double left = h->cfg->connect_timeout - (ev_now(h->loop) - h->outage_since);
        if (wait > left) wait = left > 0 ? left : 0;
    }
    ev_timer_stop(h->loop, &h->retry_timer);
    ev_timer_set(&h->retry_timer, wait, 0);
    ev_timer_start(h->loop, &h->retry_timer);
}

static void try_connect(host *h) {
    double timeout = 0;
    if (!h->ever_connected && h->cfg->connect_timeout > 0) {
        ev_now_update(h->loop);
        timeout = h->cfg->connect_timeout - (ev_now(h->loop) - h->outage_since);
        if (timeout < 0.01) timeout = 0.01;
    }
    wr_broker_connect(h->broker, timeout);
}

/* While quiet, a consumer that came back (a reconnect, a resume that met a
 * second SIGUSR1) is cancelled again at once. */
static void stay_quiet(host *h) {
    if (!h->quiet) return;
    for (size_t q = 0; q < h->cfg->nqueues; q++) {
        if (!h->queues[q].consuming) continue;
        wr_broker_cancel(h->broker, q);
        h->queues[q].consuming = false;
    }
}

/* The first "consuming" line: each queue with its prefetch. */
static void log_consuming(host *h) {
    const wr_config *c = h->cfg;
    unsigned version = wr_reloader_current(h->reloader)->version;
    if (c->nqueues == 1) {
        wr_info("consuming '%s' from %s, prefetch %d, script %s version %u", c->queues[0].name,
                wr_broker_where(h->broker), c->queues[0].prefetch, c->script, version);
        return;
    }
    char list[1024];
    size_t n = 0;
    for (size_t q = 0; q < c->nqueues && n < sizeof list; q++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s'%s' (prefetch %d)", q ? ", " : "",
                              c->queues[q].name, c->queues[q].prefetch);
    wr_info("consuming %s from %s, script %s version %u", list, wr_broker_where(h->broker),
            c->script, version);
}

static void on_consuming(void *ud, size_t q) {
    host *h = ud;
    if (q != WR_ALL_QUEUES) { /* a re-consume after a cancel */
        if (h->state != RUNNING || h->quiet) {
            /* Stopping or quiet since it was asked for: not wanted any more. */
            wr_broker_cancel(h->broker, q);
            return;
        }
        wr_info("consuming '%s' again", h->cfg->queues[q].name);
        h->queues[q].consuming = true;
        h->backoff = BACKOFF_MIN;
        send_status(h, NULL);
        check_empty(h);
        return;
    }
    if (h->ever_connected)
        wr_info("reconnected to %s after %u attempt%s (%.1f s); consuming %s again",
                wr_broker_where(h->broker), h->attempts + 1, wr_plural(h->attempts + 1),
                ev_now(h->loop) - h->outage_since, h->names);
    else
        log_consuming(h);
    bool first = !h->ever_connected;
    h->depth_asked = 0; /* new channels: an old question is gone */
    if (!first) h->stats.reconnects++;
    h->ever_connected = true;
    for (size_t i = 0; i < h->cfg->nqueues; i++)
        h->queues[i].consuming = true;
    h->state = RUNNING;
    h->attempts = 0;
    h->backoff = BACKOFF_MIN;
    stay_quiet(h);
    send_status(h, first ? "READY=1" : NULL);
    check_empty(h);
}

static void on_failed(void *ud, size_t q, wr_broker_status st, const char *err) {
    host *h = ud;
    if (q != WR_ALL_QUEUES) {
        /* A re-consume after a cancel: the queue is not back yet. */
        wr_debug("re-consuming '%s': %s", h->cfg->queues[q].name, err);
        if (h->state == RUNNING && !h->quiet) schedule_retry(h);
        return;
    }
    if (h->state != CONNECTING) return;
    if (!h->ever_connected) {
        if (st == WR_BROKER_REFUSED) {
            wr_error("%s", err);
            stop(h, WR_EXIT_NOPERM);
            return;
        }
        if (st == WR_BROKER_UNTRUSTED) {
            wr_error("%s", err);
            stop(h, WR_EXIT_PROTOCOL);
            return;
        }
        if (st == WR_BROKER_NO_QUEUE) {
            wr_error("%s", err);
            stop(h, WR_EXIT_UNAVAILABLE);
            return;
        }
        double waited = ev_now(h->loop) - h->outage_since;
        if (h->cfg->connect_timeout > 0 && waited >= h->cfg->connect_timeout - 0.02) {
            wr_error("broker unreachable: %s (gave up after %.1f s; see --connect-timeout)", err,
                     waited);
            stop(h, WR_EXIT_UNAVAILABLE);
            return;
        }
    }
    /* One line per outage, not one per attempt. */
    if (h->attempts++ == 0)
        wr_warn("%s; retrying with backoff", err);
    else
        wr_debug("attempt %u: %s", h->attempts, err);
    schedule_retry(h);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)revents;
    host *h = w->data;
    if (h->state == CONNECTING) {
        try_connect(h);
        return;
    }
    if (h->state != RUNNING || h->quiet) return;
    bool waiting = false;
    for (size_t q = 0; q < h->cfg->nqueues; q++) {
        if (h->queues[q].consuming) continue;
        /* Jobs still running hold tags of the queue's channel; a failed
         * re-consume closes it. Let them finish first, as a cancel promises.
         * A consume already asked for fails here too, and answers later. */
        if (held(h, q) > 0 || wr_broker_consume(h->broker, q)) waiting = true;
    }
    if (waiting) {
        ev_timer_set(&h->retry_timer, BACKOFF_MIN, 0);
        ev_timer_start(loop, &h->retry_timer);
    }
}

static void on_delivery(void *ud, wr_delivery *d) {
    host *h = ud;
    char err[256];
    wr_queue_stats *qs = &h->stats.queues[d->qi];
    qs->deliveries[d->redelivered ? 1 : 0]++;
    int rc = h->state == RUNNING && !h->quiet
                 ? wr_job_start(h->sched, wr_reloader_current(h->reloader), d, err, sizeof err)
                 : -1;
    if (rc == 0) {
        qs->in_flight++;
        if (h->cfg->max_jobs > 0 && ++h->started >= (unsigned long)h->cfg->max_jobs &&
            h->state == RUNNING) {
            char what[64];
            snprintf(what, sizeof what, "started %ld job%s (--max-jobs)", h->cfg->max_jobs,
                     wr_plural((unsigned long long)h->cfg->max_jobs));
            drain(h, what);
        }
        return;
    }
    const amqp_bytes_t id = d->props.message_id;
    if (rc == -2) {
        wr_error("message %.*s%s(tag %llu) rejected: it cannot be given to a job: %s", (int)id.len,
                 id.len ? (char *)id.bytes : "", id.len ? " " : "", (unsigned long long)d->tag,
                 err);
        wr_broker_settle(h->broker, d, WR_SETTLE_REJECT);
        wr_broker_release(h->broker, d);
        return;
    }
    /* Draining, quiet (or no memory for a job): hand it back unstarted. */
    if (h->state == RUNNING && !h->quiet) wr_error("cannot start a job (%s); handing it back", err);
    wr_broker_settle(h->broker, d, WR_SETTLE_REQUEUE);
    wr_debug("handed back unstarted message (tag %llu)", (unsigned long long)d->tag);
    wr_broker_release(h->broker, d);
}

static void on_cancelled(void *ud, size_t q) {
    host *h = ud;
    h->queues[q].consuming = false;
    if (h->state != RUNNING) return;
    size_t n = held(h, q);
    wr_warn("the broker cancelled the consumer of '%s' (queue deleted?); %zu of its job%s in "
            "flight finish%s, consuming it again when the queue is back",
            h->cfg->queues[q].name, n, wr_plural(n), n == 1 ? "es" : "");
    h->backoff = BACKOFF_MIN;
    schedule_retry(h);
}

static void on_lost(void *ud, const char *why) {
    host *h = ud;
    size_t n = in_flight(h);
    wr_warn("connection lost: %s; %zu job%s in flight %s interrupted and will be redelivered", why,
            n, wr_plural(n), n == 1 ? "is" : "are");
    wr_sched_interrupt_all(h->sched);
    wr_retrier_abandon(h->retrier);
    wr_broker_abort(h->broker);
    for (size_t q = 0; q < h->cfg->nqueues; q++)
        h->queues[q].consuming = false;
    if (h->state == DRAINING || h->state == CLOSING) {
        /* Whether the acks sent so far were processed cannot be known. */
        stop(h, WR_EXIT_TEMPFAIL);
        return;
    }
    h->state = CONNECTING;
    h->outage_since = ev_now(h->loop);
    h->attempts = 0;
    h->backoff = BACKOFF_MIN;
    schedule_retry(h);
    send_status(h, NULL);
}

static const char *outcome_name(wr_outcome o) {
    switch (o) {
    case WR_OUT_ACK:
        return "acked";
    case WR_OUT_REQUEUE:
        return "requeued";
    case WR_OUT_REJECT:
        return "rejected";
    case WR_OUT_FAILED:
        return "failed";
    default:
        return "interrupted, handed back";
    }
}

/* Logs a record of the job on d, of the given version (0: not known). */
#define LOG_JOB(level, d, version, ...)                                                            \
    do {                                                                                           \
        wr_log_job f_ = wr_delivery_log_fields(d, version);                                        \
        wr_log_for(level, &f_, __VA_ARGS__);                                                       \
    } while (0)

/* --until-empty: once nothing is in flight, asks whether every queue is
 * empty too (see on_depth). */
static void check_empty(host *h) {
    if (!h->cfg->until_empty || h->state != RUNNING || h->quiet || !all_consuming(h) ||
        h->depth_asked || in_flight(h) > 0)
        return;
    h->depth_left = false;
    for (size_t q = 0; q < h->cfg->nqueues; q++)
        if (wr_broker_ask_depth(h->broker, q) == 0) h->depth_asked++;
}

static void empty_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    check_empty(w->data);
}

/* The broker's answers: every queue empty, with nothing in flight, ends
 * the run; any delivery sent before an answer has arrived before it.
 * Messages left that do not come (taken by another consumer) are asked
 * about again. */
static void on_depth(void *ud, size_t q, uint32_t ready) {
    host *h = ud;
    (void)q;
    if (h->depth_asked > 0) h->depth_asked--;
    if (ready > 0) h->depth_left = true;
    if (h->depth_asked > 0) return;
    if (h->state != RUNNING || h->quiet || !all_consuming(h) || in_flight(h) > 0) return;
    if (!h->depth_left) {
        char what[2048];
        snprintf(what, sizeof what, "%s %s %s empty (--until-empty)",
                 h->cfg->nqueues > 1 ? "queues" : "queue", h->names,
                 h->cfg->nqueues > 1 ? "are" : "is");
        drain(h, what);
        return;
    }
    ev_timer_stop(h->loop, &h->empty_timer);
    ev_timer_set(&h->empty_timer, EMPTY_RECHECK, 0);
    ev_timer_start(h->loop, &h->empty_timer);
}

/* The end of the drain, once nothing is in flight any more; or of the
 * quiet stage's last job; or, with --until-empty, maybe of the run. */
static void maybe_drained(host *h) {
    if (in_flight(h) > 0) return;
    check_empty(h);
    if (h->state == DRAINING) ev_timer_start(h->loop, &h->stop_timer);
    if (h->state == RUNNING && h->quiet)
        wr_info("quiet: all jobs finished; idle until SIGTERM, or SIGUSR2 to consume again");
}

/* A failed job's message: the failure policy decides. Returns how to settle
 * it now, or -1 when a retry copy is on its way and on_retried settles it. */
static int after_failure(host *h, wr_job *job) {
    wr_delivery *d = wr_job_delivery(job);
    wr_verdict v = wr_policy_decide(h->cfg->on_error, wr_job_failure(job), wr_retry_count(d),
                                    h->cfg->max_retries);
    char what[160], err[300], copy[300];
    wr_verdict_describe(&v, what, sizeof what);
    unsigned version = wr_job_version(job);
    if (v.action != WR_VERDICT_RETRY) {
        LOG_JOB(WR_LOG_WARN, d, version, "%s", what);
        return v.action == WR_VERDICT_REJECT ? WR_SETTLE_REJECT : WR_SETTLE_REQUEUE;
    }
    if (wr_retrier_send(h->retrier, d, v.delay_ms, copy, sizeof copy, err, sizeof err) == 0) {
        /* A message without an id: its copy got one, by which the log goes on. */
        if (d->props.message_id.len)
            LOG_JOB(WR_LOG_WARN, d, version, "%s", what);
        else
            LOG_JOB(WR_LOG_WARN, d, version, "%s; the copy is message %s", what, copy);
        return -1;
    }
    LOG_JOB(WR_LOG_WARN, d, version, "%s", what);
    LOG_JOB(WR_LOG_ERROR, d, version, "cannot publish its retry copy (%s); requeueing it", err);
    return WR_SETTLE_REQUEUE;
}

/* The broker answered for a retry copy, or the wait for it was given up:
 * the original is acked, or handed back. */
static void on_retried(void *ud, wr_delivery *d, const char *err) {
    host *h = ud;
    if (err) LOG_JOB(WR_LOG_WARN, d, 0, "retry copy not confirmed (%s); handing it back", err);
    wr_broker_settle(h->broker, d, err ? WR_SETTLE_REQUEUE : WR_SETTLE_ACK);
    let_go(h, d);
    maybe_drained(h);
}

/* The job's outcome for warren_jobs_total: for a failed one, what the
 * failure policy made of it (how: the settle, or -1 for a retry copy). */
static void count_job(host *h, const wr_job *job, wr_outcome outcome, int how) {
    wr_stat_outcome so = outcome == WR_OUT_ACK           ? WR_STAT_ACK
                         : outcome == WR_OUT_REQUEUE     ? WR_STAT_REQUEUE
                         : outcome == WR_OUT_REJECT      ? WR_STAT_REJECT
                         : outcome == WR_OUT_INTERRUPTED ? WR_STAT_INTERRUPTED
                         : how < 0                       ? WR_STAT_RETRY
                         : how == WR_SETTLE_REJECT       ? WR_STAT_REJECT
                                                         : WR_STAT_REQUEUE;
    const wr_delivery *d = wr_job_delivery(job);
    wr_queue_stats *qs = &h->stats.queues[d->qi];
    qs->jobs[so]++;
    if (outcome == WR_OUT_FAILED) qs->job_errors++;
    double took = wr_clock() - wr_job_started(job);
    wr_hist_observe(&qs->job_duration, took);
    if (!h->report) return;
    wr_report_line l = {.queue = d->queue,
                        .message_id = d->props.message_id.bytes,
                        .id_len = d->props.message_id.len,
                        .delivery_tag = (unsigned long long)d->tag,
                        .outcome = wr_stat_outcome_name(so),
                        .redelivered = d->redelivered,
                        .retries = wr_retry_count(d),
                        .duration_s = took,
                        .version = wr_job_version(job),
                        .error = wr_job_error(job)};
    wr_report_job(h->report, &l);
}

static void on_job_done(void *ud, wr_job *job, wr_outcome outcome) {
    host *h = ud;
    wr_delivery *d = wr_job_delivery(job);
    int how = outcome == WR_OUT_ACK      ? WR_SETTLE_ACK
              : outcome == WR_OUT_REJECT ? WR_SETTLE_REJECT
              : outcome == WR_OUT_FAILED ? after_failure(h, job)
                                         : WR_SETTLE_REQUEUE;
    count_job(h, job, outcome, how);
    if (how < 0) return; /* on_retried settles it */
    bool settled = wr_broker_settle(h->broker, d, (wr_settle)how) == 0;
    h->done++;
    if (outcome == WR_OUT_INTERRUPTED) h->interrupted++;
    wr_log_level level = h->state == DRAINING ? WR_LOG_INFO : WR_LOG_DEBUG;
    if (wr_log_enabled(level))
        LOG_JOB(level, d, wr_job_version(job), "%s on version %u%s; %zu in flight",
                outcome_name(outcome), wr_job_version(job),
                settled ? "" : " (not settled: its connection is gone, the broker redelivers it)",
                wr_sched_running(h->sched));
    let_go(h, d);
    maybe_drained(h);
}

static void stop_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    host *h = w->data;
    if (h->state != DRAINING || in_flight(h)) return;
    wr_info("drained: all jobs finished; closing the connection");
    if (wr_broker_close(h->broker, CLOSE_TIMEOUT)) {
        wr_warn("not connected: the last acks may not have reached the broker");
        stop(h, WR_EXIT_TEMPFAIL);
        return;
    }
    h->state = CLOSING;
}

static void on_closed(void *ud, bool clean) {
    host *h = ud;
    if (h->state != CLOSING) return;
    if (!clean) {
        wr_warn("the broker did not confirm the close within %g s: the last acks may not have "
                "reached it; exiting with %d",
                CLOSE_TIMEOUT, WR_EXIT_TEMPFAIL);
        stop(h, WR_EXIT_TEMPFAIL);
        return;
    }
    stop(h, WR_EXIT_OK);
}

static void force(host *h, const char *reason) {
    /* Jobs the count hook already ended for this stage count as interrupted by it. */
    unsigned before = h->forcing ? h->forced_from : h->interrupted;
    size_t n = wr_sched_running(h->sched) + (h->interrupted - before),
           retrying = wr_retrier_pending(h->retrier);
    wr_warn("forced exit (%s): interrupting %zu job%s", reason, n, wr_plural(n));
    wr_sched_interrupt_all(h->sched);
    wr_retrier_abandon(h->retrier);
    size_t back = h->interrupted - before + retrying;
    wr_warn("handed back %zu message%s; exiting", back, wr_plural(back));
    wr_broker_abort(h->broker);
    stop(h, WR_EXIT_TEMPFAIL);
}

static void drain_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    host *h = w->data;
    char reason[64];
    snprintf(reason, sizeof reason, "drain timeout of %g s reached", h->cfg->drain_timeout);
    force(h, reason);
}

/* The first stage of stopping, for what (a signal received, --max-jobs
 * reached, the queue empty under --until-empty). */
static void drain(host *h, const char *what) {
    size_t n = in_flight(h);
    if (h->state != RUNNING) {
        /* Not connected: nothing can be in flight. */
        wr_info("%s while not connected; exiting", what);
        wr_notify_send(h->notify, "STOPPING=1");
        stop(h, WR_EXIT_OK);
        return;
    }
    h->state = DRAINING;
    h->ctx.draining = true;
    /* The stop may take the drain, the close handshake and a margin. */
    char extend[64];
    snprintf(extend, sizeof extend, "STOPPING=1\nEXTEND_TIMEOUT_USEC=%llu",
             (unsigned long long)((h->cfg->drain_timeout + CLOSE_TIMEOUT + 1) * 1e6));
    send_status(h, extend);
    ev_timer_stop(h->loop, &h->retry_timer);
    for (size_t q = 0; q < h->cfg->nqueues; q++) {
        if (h->queues[q].consuming) wr_broker_cancel(h->broker, q);
        h->queues[q].consuming = false;
    }
    if (n == 0) {
        wr_info("%s, nothing in flight; exiting", what);
        ev_timer_start(h->loop, &h->stop_timer);
        return;
    }
    wr_info("%s: draining %zu job%s in flight, up to %g s; a second signal forces exit", what, n,
            wr_plural(n), h->cfg->drain_timeout);
    ev_timer_set(&h->drain_timer, h->cfg->drain_timeout, 0);
    ev_timer_start(h->loop, &h->drain_timer);
    h->drain_deadline = ev_time() + h->cfg->drain_timeout;
}

/* SIGINT and SIGTERM received so far; see count_signal and urgent. */
static volatile sig_atomic_t stop_signals;

static void count_signal(int signum) {
    stop_signals++;
    ev_feed_signal(signum);
}

/* Called from the count hook while a job computes where it cannot yield:
 * keeps the broker's connections alive, and ends that job when a second
 * signal came or the drain timeout passed (the forced stage then follows in
 * the loop). Touches no job. */
static bool urgent(void *ud) {
    host *h = ud;
    wr_broker_keepalive(h->broker);
    wr_notify_keepalive(h->notify);
    bool force = stop_signals >= 2 || (h->state == DRAINING && ev_is_active(&h->drain_timer) &&
                                       ev_time() >= h->drain_deadline);
    if (force && !h->forcing) {
        h->forcing = true;
        h->forced_from = h->interrupted;
    }
    return force;
}

/* SIGUSR1, the quiet stage: stop taking work but stay connected. The
 * consumer is cancelled (what the broker sends until cancel-ok is handed
 * back), jobs in flight finish and are acked, and the worker idles. */
static void quiet_cb(struct ev_loop *loop, ev_signal *w, int revents) {
    (void)loop, (void)revents;
    host *h = w->data;
    if (h->quiet || h->state == DRAINING || h->state == CLOSING || h->state == STOPPED) return;
    h->quiet = true;
    ev_timer_stop(h->loop, &h->retry_timer); /* a re-consume after a cancel waits for SIGUSR2 */
    stay_quiet(h);
    size_t n = in_flight(h);
    wr_info("received SIGUSR1: quiet: no new work; %zu job%s in flight finish%s; SIGUSR2 consumes "
            "again",
            n, wr_plural(n), n == 1 ? "es" : "");
    send_status(h, NULL);
    maybe_drained(h);
}

/* SIGUSR2 ends the quiet stage: the consumer comes back as after a cancel
 * by the broker, once the jobs of the old one have finished. */
static void resume_cb(struct ev_loop *loop, ev_signal *w, int revents) {
    (void)loop, (void)revents;
    host *h = w->data;
    if (!h->quiet || h->state == DRAINING || h->state == CLOSING || h->state == STOPPED) return;
    h->quiet = false;
    wr_info("received SIGUSR2: consuming %s again", h->names);
    if (h->state == RUNNING && !all_consuming(h)) {
        h->backoff = BACKOFF_MIN;
        schedule_retry(h);
    }
    send_status(h, NULL);
}

/* A reload is RELOADING=1 for the service manager until it ends. */
static void on_reload(void *ud, wr_reload_event ev) {
    host *h = ud;
    if (ev == WR_RELOAD_DONE) h->stats.reloads_ok++;
    if (ev == WR_RELOAD_FAILED) h->stats.reloads_failed++;
    if (ev == WR_RELOAD_BEGINS)
        wr_notify_send(h->notify, "RELOADING=1\nMONOTONIC_USEC=%llu", wr_notify_monotonic_usec());
    else
        send_status(h, "READY=1");
}

static void sighup_cb(struct ev_loop *loop, ev_signal *w, int revents) {
    (void)loop, (void)revents;
    host *h = w->data;
    wr_reloader_request(h->reloader, "SIGHUP");
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents) {
    (void)loop, (void)revents;
    host *h = w->data;
    const char *name = w->signum == SIGINT ? "SIGINT" : "SIGTERM";
    if (h->state == STOPPED) return;
    /* Two signals can reach the loop as one (libev marks a signal pending,
     * it does not count): stop_signals has the true count. */
    if (h->state == DRAINING || h->state == CLOSING || stop_signals >= 2) {
        char reason[64];
        snprintf(reason, sizeof reason, "second signal, %s", name);
        force(h, reason);
    } else {
        char what[32];
        snprintf(what, sizeof what, "received %s", name);
        drain(h, what);
    }
}

static char *serve_metrics(void *ud, size_t *len) {
    host *h = ud;
    wr_gauges g = {.connected = wr_broker_connected(h->broker),
                   .quiet = h->quiet,
                   .script_version = wr_reloader_current(h->reloader)->version,
                   .start_time = h->start_time};
    return wr_stats_render(&h->stats, &g, len);
}

/* Healthy while connected and consuming, quiet or draining. */
static bool serve_health(void *ud, char *json, size_t len) {
    host *h = ud;
    bool connected = wr_broker_connected(h->broker);
    bool ok = connected &&
              (h->state == DRAINING || (h->state == RUNNING && (all_consuming(h) || h->quiet)));
    snprintf(json, len,
             "{\"status\":\"%s\",\"state\":\"%s\",\"connected\":%s,\"in_flight\":%zu,"
             "\"done\":%lu,\"version\":%u}",
             ok ? "ok" : "unavailable", state_name(h), connected ? "true" : "false", in_flight(h),
             h->done, wr_reloader_current(h->reloader)->version);
    return ok;
}

/* The queues' state, names and counters. Returns 0, or -1 when out of memory. */
static int know_queues(host *h) {
    const wr_config *c = h->cfg;
    const char **names = calloc(c->nqueues, sizeof *names);
    size_t len = 1;
    for (size_t q = 0; q < c->nqueues; q++)
        len += strlen(c->queues[q].name) + 4;
    h->queues = calloc(c->nqueues, sizeof *h->queues);
    h->names = malloc(len);
    if (!names || !h->queues || !h->names) {
        free(names);
        return -1;
    }
    size_t n = 0;
    for (size_t q = 0; q < c->nqueues; q++) {
        names[q] = c->queues[q].name;
        n += (size_t)snprintf(h->names + n, len - n, "%s'%s'", q ? ", " : "", names[q]);
    }
    int rc = wr_stats_init(&h->stats, names, c->nqueues);
    free(names);
    return rc;
}

static void forget_queues(host *h) {
    wr_stats_free(&h->stats);
    free(h->queues);
    free(h->names);
}

/* Frees what wr_host_run made before the loop could run. */
static int give_up(host *h, int code) {
    wr_report_close(h->report);
    wr_metrics_free(h->metrics);
    wr_notify_free(h->notify);
    wr_reloader_free(h->reloader);
    wr_retrier_free(h->retrier);
    if (h->broker) wr_broker_free(h->broker);
    wr_sched_free(h->sched);
    if (h->loop) ev_loop_destroy(h->loop);
    forget_queues(h);
    return code;
}

int wr_host_run(const wr_config *cfg) {
    host hs = {0}, *h = &hs;
    char err[WR_LOAD_ERROR_MAX];
    h->cfg = cfg;
    if (know_queues(h)) {
        wr_error("out of memory");
        return give_up(h, WR_EXIT_UNAVAILABLE);
    }
    h->start_time = ev_time();
    if ((cfg->tls_ca || cfg->tls_cert) &&
        wr_dial_tls_setup(cfg->tls_ca, cfg->tls_cert, cfg->tls_key, err, sizeof err)) {
        wr_error("%s", err);
        return give_up(h, WR_EXIT_USAGE);
    }
    /* Not the default loop: libev's default loop reaps every child on
     * SIGCHLD, which would take io.popen's and os.execute's exit status. */
    h->loop = ev_loop_new(EVFLAG_AUTO);
    if (!h->loop) {
        wr_error("cannot initialise the event loop");
        return give_up(h, WR_EXIT_UNAVAILABLE);
    }
    h->sched = wr_sched_new(h->loop, on_job_done, h);
    static const wr_broker_events events = {on_consuming, on_failed, on_delivery, on_cancelled,
                                            on_lost,      on_closed, on_depth};
    h->broker = h->sched ? wr_broker_new(h->loop, cfg, &events, h) : NULL;
    h->retrier = h->broker ? wr_retrier_new(wr_broker_publisher(h->broker), on_retried, h) : NULL;
    if (!h->retrier) {
        wr_error("out of memory");
        return give_up(h, WR_EXIT_UNAVAILABLE);
    }
    h->ctx = (wr_ctx){.loop = h->loop,
                      .cfg = cfg,
                      .pub = wr_broker_publisher(h->broker),
                      .stats = &h->stats,
                      .urgent = urgent,
                      .urgent_ud = h};
    wr_sched_set_job_timeout(h->sched, cfg->job_timeout);
    wr_vm_set_memory_limit(cfg->memory_limit);
    wr_vm *first = wr_load_script(cfg->script, 1, &h->ctx, err, sizeof err);
    if (!first) {
        wr_error("%s", err);
        return give_up(h, WR_EXIT_CONFIG);
    }
    h->reloader = wr_reloader_new(h->loop, cfg, &h->ctx, first, on_reload, h);
    if (!h->reloader) wr_vm_unref(first);
    h->notify = h->reloader ? wr_notify_new(h->loop) : NULL;
    if (!h->notify) {
        wr_error("out of memory");
        return give_up(h, WR_EXIT_UNAVAILABLE);
    }
    if (cfg->report && !(h->report = wr_report_open(cfg->report, err, sizeof err))) {
        wr_error("%s", err);
        return give_up(h, WR_EXIT_USAGE);
    }
    if (cfg->metrics_port) {
        wr_metrics_source src = {serve_metrics, serve_health, h, &h->stats.loop_lag};
        h->metrics =
            wr_metrics_start(h->loop, cfg->metrics_host, cfg->metrics_port, &src, err, sizeof err);
        if (!h->metrics) {
            wr_error("%s", err);
            return give_up(h, WR_EXIT_UNAVAILABLE);
        }
    }
    signal(SIGPIPE, SIG_IGN);
    ev_signal_init(&h->sigint, signal_cb, SIGINT);
    ev_signal_init(&h->sigterm, signal_cb, SIGTERM);
    ev_signal_init(&h->sighup, sighup_cb, SIGHUP);
    ev_signal_init(&h->sigquiet, quiet_cb, SIGUSR1);
    ev_signal_init(&h->sigresume, resume_cb, SIGUSR2);
    h->sigint.data = h->sigterm.data = h->sighup.data = h->sigquiet.data = h->sigresume.data = h;
    ev_signal_start(h->loop, &h->sigint);
    ev_signal_start(h->loop, &h->sigterm);
    ev_signal_start(h->loop, &h->sighup);
    ev_signal_start(h->loop, &h->sigquiet);
    ev_signal_start(h->loop, &h->sigresume);
    /* libev's handlers only mark the signal for the loop; ours also counts
     * it, so a job computing where it cannot yield learns of it. */
    struct sigaction sa = {0};
    sa.sa_handler = count_signal;
    sa.sa_flags = SA_RESTART;
    sigfillset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    ev_timer_init(&h->drain_timer, drain_timeout_cb, 0, 0);
    ev_timer_init(&h->retry_timer, retry_cb, 0, 0);
    ev_timer_init(&h->stop_timer, stop_cb, 0, 0);
    ev_timer_init(&h->status_timer, status_cb, 1, 1);
    ev_timer_init(&h->empty_timer, empty_cb, EMPTY_RECHECK, 0);
    h->empty_timer.data = h;
    h->drain_timer.data = h->retry_timer.data = h->stop_timer.data = h->status_timer.data = h;
    if (wr_notify_enabled(h->notify)) {
        send_status(h, NULL);
        ev_timer_start(h->loop, &h->status_timer);
    }

    h->state = CONNECTING;
    h->outage_since = ev_now(h->loop);
    h->backoff = BACKOFF_MIN;
    srand((unsigned)(ev_time() * 1e6));
    try_connect(h);
    if (h->state != STOPPED) ev_run(h->loop, 0);
    /* The exit code is decided: a signal arriving from now on (a second one
     * sent just behind the first) must neither reach the loop nor, once
     * libev has put the default action back, kill the process. */
    sigset_t late;
    sigemptyset(&late);
    sigaddset(&late, SIGINT);
    sigaddset(&late, SIGTERM);
    sigaddset(&late, SIGHUP);
    sigaddset(&late, SIGUSR1);
    sigaddset(&late, SIGUSR2);
    sigprocmask(SIG_BLOCK, &late, NULL);
    wr_spawn_shutdown(); /* no child outlives warren */
    wr_http_shutdown();

    wr_retrier_free(h->retrier); /* every way out of the loop settled or abandoned its copies */
    wr_broker_free(h->broker);
    wr_sched_free(h->sched);
    wr_reloader_free(h->reloader);
    ev_timer_stop(h->loop, &h->status_timer);
    ev_timer_stop(h->loop, &h->empty_timer);
    wr_notify_free(h->notify);
    wr_metrics_free(h->metrics);
    wr_report_close(h->report);
    /* Signal handlers outlive the loop: a late signal must not reach it. */
    ev_signal_stop(h->loop, &h->sigint);
    ev_signal_stop(h->loop, &h->sigterm);
    ev_signal_stop(h->loop, &h->sighup);
    ev_signal_stop(h->loop, &h->sigquiet);
    ev_signal_stop(h->loop, &h->sigresume);
    ev_loop_destroy(h->loop);
    forget_queues(h);
    return h->exit_code;
}
