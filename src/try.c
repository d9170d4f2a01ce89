#include "warren/try.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "warren/job.h"
#include "warren/load.h"
#include "warren/log.h"
#include "warren/retry.h"
#include "warren/spawn.h"
#include "warren/vm.h"

int wr_check(const wr_config *cfg) {
    char err[WR_LOAD_ERROR_MAX];
    static const wr_ctx nothing; /* the main chunk only: no loop, nothing waits */
    wr_vm_set_memory_limit(cfg->memory_limit);
    wr_vm *vm = wr_load_script(cfg->script, 1, &nothing, err, sizeof err);
    if (!vm) {
        fprintf(stderr, "%s\n", err);
        return WR_EXIT_CONFIG;
    }
    printf("%s: ok\n", cfg->script);
    wr_vm_unref(vm);
    return 0;
}

typedef struct trial {
    const wr_config *cfg;
    int done;
    wr_outcome outcome;
    wr_verdict verdict; /* when the outcome is WR_OUT_FAILED */
    wr_sched *sched;
    bool stopped; /* a signal interrupted the job: run no more bodies */
    ev_signal sigint, sigterm;
} trial;

/* While a job runs, SIGINT or SIGTERM interrupts it as the forced stage of
 * the worker would: its <close> variables run and its children are ended.
 * Between jobs the signals keep their default action. */
static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents) {
    (void)loop, (void)revents;
    trial *t = w->data;
    t->stopped = true;
    wr_sched_interrupt_all(t->sched);
}

/* A failed job: logs what the failure policy would do with its message in
 * the worker, as the worker logs it. */
static void on_done(void *ud, wr_job *job, wr_outcome outcome) {
    trial *t = ud;
    t->done = 1;
    t->outcome = outcome;
    if (outcome != WR_OUT_FAILED) return;
    const wr_delivery *d = wr_job_delivery(job);
    t->verdict = wr_policy_decide(t->cfg->on_error, wr_job_failure(job), wr_retry_count(d),
                                  t->cfg->max_retries);
    char what[160];
    wr_verdict_describe(&t->verdict, what, sizeof what);
    wr_log_job f = wr_delivery_log_fields(d, NULL, wr_job_version(job));
    wr_log_for(WR_LOG_WARN, &f, "%s", what);
}

/* The outcome line's word: for a failed job, what the policy decided. */
static const char *name(const trial *t) {
    static const char *const verdicts[] = {[WR_VERDICT_RETRY] = "retry",
                                           [WR_VERDICT_REQUEUE] = "requeue",
                                           [WR_VERDICT_REJECT] = "reject"};
    if (t->outcome == WR_OUT_FAILED) return verdicts[t->verdict.action];
    switch (t->outcome) {
    case WR_OUT_ACK:
        return "ack";
    case WR_OUT_REQUEUE:
        return "requeue";
    case WR_OUT_REJECT:
        return "reject";
    default:
        return "interrupted";
    }
}

/* Runs one body to its end; returns 1 when it was acked. */
static int run_one(struct ev_loop *loop, wr_sched *s, trial *t, wr_vm *vm, wr_assembler *a, long n,
                   const char *body, size_t len) {
    char id[32];
    snprintf(id, sizeof id, "try-%ld", n);
    /* The same frames a broker would send, through the same assembler. */
    amqp_basic_deliver_t m = {.delivery_tag = (uint64_t)n,
                              .exchange = amqp_empty_bytes,
                              .routing_key = amqp_cstring_bytes("try")};
    amqp_basic_properties_t p = {._flags = AMQP_BASIC_MESSAGE_ID_FLAG,
                                 .message_id = amqp_cstring_bytes(id)};
    amqp_frame_t f[3] = {0};
    f[0].frame_type = AMQP_FRAME_METHOD;
    f[0].payload.method.id = AMQP_BASIC_DELIVER_METHOD;
    f[0].payload.method.decoded = &m;
    f[1].frame_type = AMQP_FRAME_HEADER;
    f[1].payload.properties.body_size = len;
    f[1].payload.properties.decoded = &p;
    f[2].frame_type = AMQP_FRAME_BODY;
    f[2].payload.body_fragment = (amqp_bytes_t){len, (void *)body};
    wr_delivery *d = NULL;
    for (int i = 0; i < 3 && !d; i++)
        if (wr_assembler_feed(a, &f[i], &d) == WR_FRAME_ERROR) break;
    char err[256] = "not enough memory";
    if (!d || wr_job_start(s, vm, d, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        wr_delivery_release(a, d);
        return 0;
    }
    ev_signal_start(loop, &t->sigint);
    ev_signal_start(loop, &t->sigterm);
    while (!t->done)
        ev_run(loop, EVRUN_ONCE);
    ev_signal_stop(loop, &t->sigint);
    ev_signal_stop(loop, &t->sigterm);
    printf("%s: %s\n", id, name(t));
    fflush(stdout);
    t->done = 0;
    wr_delivery_release(a, d);
    return t->outcome == WR_OUT_ACK;
}

int wr_try(const wr_config *cfg) {
    char err[WR_LOAD_ERROR_MAX];
    trial t = {.cfg = cfg};
    /* Not libev's default loop, which reaps every child (see wr_host_run). */
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    wr_sched *s = loop ? wr_sched_new(loop, on_done, &t) : NULL;
    /* No publisher: what a job publishes is only logged. */
    wr_ctx ctx = {.loop = loop, .cfg = cfg};
    wr_vm_set_memory_limit(cfg->memory_limit);
    wr_vm *vm = s ? wr_load_script(cfg->script, 1, &ctx, err, sizeof err) : NULL;
    if (!vm) {
        fprintf(stderr, "%s\n", s ? err : "out of memory");
        wr_sched_free(s);
        if (loop) ev_loop_destroy(loop);
        return WR_EXIT_CONFIG;
    }
    t.sched = s;
    wr_sched_set_job_timeout(s, cfg->job_timeout);
    wr_sched_set_virtual_time(s, cfg->virtual_time);
    ev_signal_init(&t.sigint, signal_cb, SIGINT);
    ev_signal_init(&t.sigterm, signal_cb, SIGTERM);
    t.sigint.data = t.sigterm.data = &t;
    wr_assembler a;
    wr_assembler_init(&a, 1);
    int all_acked = 1;
    long n = 0;
    if (cfg->nbodies > 0) {
        for (int i = 0; i < cfg->nbodies && !t.stopped; i++)
            all_acked &= run_one(loop, s, &t, vm, &a, ++n, cfg->bodies[i], strlen(cfg->bodies[i]));
    } else {
        if (isatty(0))
            fprintf(stderr, "warren try: reading bodies from standard input, one per line; "
                            "Ctrl-D ends\n");
        char *line = NULL;
        size_t cap = 0;
        ssize_t len;
        while (!t.stopped && (len = getline(&line, &cap, stdin)) >= 0) {
            if (len > 0 && line[len - 1] == '\n') len--;
            all_acked &= run_one(loop, s, &t, vm, &a, ++n, line, (size_t)len);
        }
        free(line);
    }
    wr_assembler_free(&a);
    wr_vm_unref(vm);
    wr_sched_free(s);
    wr_spawn_shutdown();
    ev_loop_destroy(loop);
    if (t.stopped) return WR_EXIT_TEMPFAIL;
    return all_acked ? 0 : 1;
}
