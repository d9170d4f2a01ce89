#include "warren/reload.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/load.h"
#include "warren/log.h"

/* Editors save in several steps (write, rename): one reload per burst. */
#define RELOAD_SETTLE 0.2
/* How far file timestamps (the kernel's coarse clock) may lag ev_time(). */
#define FILE_CLOCK_LAG 0.02
#define MAX_WATCHES 32
/* A reload's reason: a path and a few words. */
#define WHY_MAX (PATH_MAX + 32)

struct wr_reloader {
    struct ev_loop *loop;
    const wr_config *cfg;
    const wr_ctx *ctx;
    wr_vm *vm; /* the current version; jobs pin their own */
    unsigned last_version;
    wr_load *loading; /* the version whose main chunk runs, or NULL */
    wr_reload_fn tell;
    void *tell_ud;
    char why[WHY_MAX];   /* the load's reason: "SIGHUP", "FILE changed" */
    char again[WHY_MAX]; /* a request that came during the load: its reason, or "" */
    ev_idle step_idle;   /* keeps the loop from blocking during a load */
    ev_check step;       /* runs the next slice of the main chunk */
    ev_timer timer;
    ev_stat watches[MAX_WATCHES];
    size_t nwatches;
};

/* Seconds from now until just past the current second of the wall clock,
 * which file timestamps follow. The margin covers the kernel stamping files
 * from a coarse clock that can lag ev_time(). */
static ev_tstamp past_this_second(void) {
    ev_tstamp now = ev_time();
    return (ev_tstamp)((time_t)now + 1) + FILE_CLOCK_LAG - now;
}

/* ev_stat compares whole seconds, so a save in the same second as the state
 * a watcher last saw, and of the same size, goes unnoticed. Called after the
 * files were read or looked at: if one was written in this second, look
 * again (timer_cb) once it is over. A pending timer will call this again
 * when it fires. */
static void recheck_if_recent(wr_reloader *r) {
    if (!r->cfg->watch || ev_is_active(&r->timer) || r->loading) return;
    if (!wr_vm_touched_since(r->vm, (time_t)(ev_time() - FILE_CLOCK_LAG))) return;
    ev_timer_set(&r->timer, past_this_second(), 0);
    ev_timer_start(r->loop, &r->timer);
}

static void stat_cb(struct ev_loop *loop, ev_stat *w, int revents) {
    (void)revents;
    wr_reloader *r = w->data;
    /* Restarting the timer makes a burst of changes one reload. Firing past
     * the current second also makes the reload read any later save of the
     * same second, which ev_stat cannot tell apart (libev's documented
     * remedy). */
    ev_tstamp settle = past_this_second();
    ev_timer_stop(loop, &r->timer);
    ev_timer_set(&r->timer, settle > RELOAD_SETTLE ? settle : RELOAD_SETTLE, 0);
    ev_timer_start(loop, &r->timer);
}

static void unwatch_files(wr_reloader *r) {
    for (size_t i = 0; i < r->nwatches; i++)
        ev_stat_stop(r->loop, &r->watches[i]);
    r->nwatches = 0;
}

/* Watches the files of the current version: the script and the modules it
 * required from its own directory. */
static void watch_files(wr_reloader *r) {
    if (!r->cfg->watch) return;
    unwatch_files(r);
    for (size_t i = 0; i < r->vm->nfiles && r->nwatches < MAX_WATCHES; i++) {
        ev_stat *w = &r->watches[r->nwatches++];
        ev_stat_init(w, stat_cb, r->vm->files[i].path, 1.0);
        w->data = r;
        ev_stat_start(r->loop, w);
    }
    recheck_if_recent(r);
}

static void stop_loading(wr_reloader *r) {
    ev_idle_stop(r->loop, &r->step_idle);
    ev_check_stop(r->loop, &r->step);
    if (r->loading) wr_load_end(r->loading);
    r->loading = NULL;
}

static void start_loading(wr_reloader *r, const char *why) {
    char err[WR_LOAD_ERROR_MAX];
    unsigned version = ++r->last_version;
    snprintf(r->why, sizeof r->why, "%s", why);
    r->tell(r->tell_ud, WR_RELOAD_BEGINS);
    r->loading = wr_load_begin(r->cfg->script, version, r->ctx, err, sizeof err);
    if (!r->loading) {
        wr_error("reload (%s) failed, version %u keeps serving: %s", why, r->vm->version, err);
        r->tell(r->tell_ud, WR_RELOAD_FAILED);
        recheck_if_recent(r);
        return;
    }
    wr_debug("reload (%s): loading version %u", why, version);
    ev_idle_start(r->loop, &r->step_idle);
    ev_check_start(r->loop, &r->step);
}

/* One slice of the main chunk per loop turn; then the new version serves,
 * or the failure is logged. */
static void step_cb(struct ev_loop *loop, ev_check *w, int revents) {
    (void)loop, (void)revents;
    wr_reloader *r = w->data;
    char err[WR_LOAD_ERROR_MAX];
    wr_load_status st = wr_load_step(r->loading, err, sizeof err);
    if (st == WR_LOAD_RUNNING) return;
    if (st == WR_LOAD_FAILED) {
        wr_error("reload (%s) failed, version %u keeps serving: %s", r->why, r->vm->version, err);
        stop_loading(r);
        r->tell(r->tell_ud, WR_RELOAD_FAILED);
    } else {
        wr_vm *old = r->vm;
        r->vm = wr_load_end(r->loading);
        r->loading = NULL;
        stop_loading(r);
        watch_files(r);   /* before the unref: the watchers use the old version's paths */
        wr_vm_unref(old); /* closed when its last job ends */
        int alive = wr_vm_alive();
        wr_info("reloaded (%s): version %u serves new messages; %d version%s alive", r->why,
                r->vm->version, alive, wr_plural((unsigned)alive));
        r->tell(r->tell_ud, WR_RELOAD_DONE);
    }
    if (r->again[0]) {
        char why[WHY_MAX];
        memcpy(why, r->again, sizeof why);
        r->again[0] = '\0';
        start_loading(r, why);
        return;
    }
    recheck_if_recent(r);
}

static void idle_cb(struct ev_loop *loop, ev_idle *w, int revents) {
    (void)loop, (void)w, (void)revents;
}

void wr_reloader_request(wr_reloader *r, const char *why) {
    if (r->loading)
        snprintf(r->again, sizeof r->again, "%s", why);
    else
        start_loading(r, why);
}

/* Reloads unless nothing changed since the current version was read (a look
 * past a second, or a SIGHUP that came first). */
static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    wr_reloader *r = w->data;
    const char *path = wr_vm_changed(r->vm);
    if (path || r->loading) {
        char why[WHY_MAX];
        /* During a load, the version that loads read the files: something changed since. */
        snprintf(why, sizeof why, "%s changed", path ? path : "a file of the script");
        wr_reloader_request(r, why);
        return;
    }
    wr_debug("script files unchanged since version %u read them", r->vm->version);
    recheck_if_recent(r);
}

wr_reloader *wr_reloader_new(struct ev_loop *loop, const wr_config *cfg, const wr_ctx *ctx,
                             wr_vm *first, wr_reload_fn fn, void *ud) {
    wr_reloader *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->tell = fn;
    r->tell_ud = ud;
    r->loop = loop;
    r->cfg = cfg;
    r->ctx = ctx;
    r->vm = first;
    r->last_version = first->version;
    ev_idle_init(&r->step_idle, idle_cb);
    ev_check_init(&r->step, step_cb);
    ev_timer_init(&r->timer, timer_cb, 0, 0);
    r->step.data = r->timer.data = r;
    watch_files(r);
    return r;
}

wr_vm *wr_reloader_current(const wr_reloader *r) {
    return r->vm;
}

void wr_reloader_free(wr_reloader *r) {
    if (!r) return;
    unwatch_files(r);
    ev_timer_stop(r->loop, &r->timer);
    stop_loading(r);
    wr_vm_unref(r->vm);
    free(r);
}
