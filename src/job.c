#include "warren/job.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "warren/config.h"
#include "warren/context.h"
#include "warren/log.h"
#include "warren/msg.h"

struct wr_job {
    wr_sched *sched;
    wr_vm *vm;
    lua_State *co;
    int co_ref; /* registry reference in vm->L that keeps co alive */
    wr_delivery *delivery;
    wr_wait wait;
    wr_wait_cancel cancel; /* set while waiting on something other than the timer */
    void *wait_data;
    ev_timer timer;
    ev_timer deadline; /* --job-timeout */
    int decided;       /* a wr_outcome chosen by the script, or -1 */
    int failure;       /* a wr_failure once the job failed, or -1 */
    bool running;      /* its coroutine is being resumed */
    bool closing;      /* ending: its coroutine is being closed, no wait may start */
    bool interrupt;    /* the hook ends it: the forced stage came while it computed */
    bool ended;        /* handle returned: its coroutine is dead and clean */
    double expires;    /* monotonic time of its --job-timeout, 0 for none */
    double started;
    char *error; /* the first failure's message, or NULL */
    double resumed_at;
    wr_job *prev, *next;             /* all running jobs */
    wr_job *prev_ready, *next_ready; /* jobs to resume on the next loop turn */
    bool queued;                     /* on that list */
};

/* Finished jobs' structs kept for the next ones, at most this many. */
#define SPARE_JOBS 256

struct wr_sched {
    struct ev_loop *loop;
    wr_job_done_fn done;
    void *ud;
    wr_job *jobs;
    size_t running;
    wr_job *ready, *ready_tail; /* jobs that gave up a time slice */
    size_t nready;
    wr_job *spare; /* freed job structs, linked by next */
    size_t nspare;
    ev_idle idle;       /* keeps the loop from blocking while jobs are ready */
    ev_check check;     /* resumes ready jobs after each poll */
    double job_timeout; /* seconds, 0 = none */
    bool virtual_time;  /* sleeps are skipped, and counted in skipped */
    double skipped;     /* seconds of sleep skipped so far */
    wr_job *current;    /* the job being resumed: its lua_resume is on the C stack */
};

/* The scheduler whose job is running, for the count hook: a hook sees only
 * the lua_State, which is a nested coroutine or a C boundary's callee as
 * often as the job's own coroutine. One loop thread, one running job. */
static wr_sched *active;

double wr_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The scheduler's clock: wr_clock, plus the sleeps virtual time skipped. */
static double sched_clock(const wr_sched *s) {
    return wr_clock() + s->skipped;
}

double wr_job_clock(const wr_job *j) {
    return sched_clock(j->sched);
}

static inline wr_job **job_slot(lua_State *L) {
    return (wr_job **)lua_getextraspace(L);
}

wr_job *wr_job_current(lua_State *L) {
    return *job_slot(L);
}

wr_job *wr_job_need(lua_State *L, const char *fn) {
    wr_job *j = wr_job_current(L);
    if (!j)
        luaL_error(L,
                   "warren.%s can only be called from a job's own coroutine "
                   "(not at load time nor from a nested coroutine)",
                   fn);
    return j;
}

wr_job *wr_job_need_wait(lua_State *L, const char *fn) {
    wr_job *j = wr_job_need(L, fn);
    if (j->closing)
        luaL_error(L, "warren.%s cannot wait: the job is over and its <close> handlers are running",
                   fn);
    if (j->co != L || !lua_isyieldable(L))
        luaL_error(L,
                   "warren.%s cannot wait here: it was called through a C function that cannot "
                   "yield (a metamethod, table.sort, string.gsub, ...)",
                   fn);
    return j;
}

wr_delivery *wr_job_delivery(const wr_job *j) {
    return j->delivery;
}
const char *wr_job_error(const wr_job *j) {
    return j->error;
}
double wr_job_started(const wr_job *j) {
    return j->started;
}
unsigned wr_job_version(const wr_job *j) {
    return j->vm->version;
}

static void finish(wr_job *j, wr_outcome outcome, bool failed);

/* Fails j for running past --job-timeout (wr_job_fail), with the reason in
 * why: a job running now must then raise it as an error. */
static void time_out(wr_job *j, char *why, size_t len) {
    snprintf(why, len, "ran longer than %g s (--job-timeout)", j->sched->job_timeout);
    wr_job_fail(j, WR_FAIL_TIMEOUT, why);
}
static void run(wr_job *j, int nargs);

static void unready(wr_job *j);

static void check_cb(struct ev_loop *loop, ev_check *w, int revents) {
    (void)revents;
    wr_sched *s = w->data;
    /* Only the jobs ready now, and for one time slice in all: a job that
     * yields again joins the end of the list and waits for the next turn;
     * those not reached stay at its head and go first then. */
    size_t n = s->nready;
    double start = wr_clock();
    while (n-- > 0 && s->ready) {
        wr_job *j = s->ready;
        unready(j);
        run(j, 0);
        if (wr_clock() - start >= WR_SLICE_SECONDS) break;
    }
    if (!s->ready) {
        ev_idle_stop(loop, &s->idle);
        ev_check_stop(loop, &s->check);
    }
}

static void idle_cb(struct ev_loop *loop, ev_idle *w, int revents) {
    (void)loop, (void)w, (void)revents;
}

static void make_ready(wr_job *j) {
    wr_sched *s = j->sched;
    j->wait = WR_WAIT_SLICE;
    j->next_ready = NULL;
    j->prev_ready = s->ready_tail;
    if (s->ready_tail)
        s->ready_tail->next_ready = j;
    else
        s->ready = j;
    s->ready_tail = j;
    j->queued = true;
    s->nready++;
    ev_idle_start(s->loop, &s->idle);
    ev_check_start(s->loop, &s->check);
}

/* Takes j off the ready list, if it is there. */
static void unready(wr_job *j) {
    if (!j->queued) return;
    wr_sched *s = j->sched;
    if (j->prev_ready)
        j->prev_ready->next_ready = j->next_ready;
    else
        s->ready = j->next_ready;
    if (j->next_ready)
        j->next_ready->prev_ready = j->prev_ready;
    else
        s->ready_tail = j->prev_ready;
    j->prev_ready = j->next_ready = NULL;
    j->queued = false;
    s->nready--;
}

void wr_job_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    wr_job *j = active ? active->current : NULL;
    if (!j) return;
    /* A job being ended (forced stage, timeout) unwinds with an error, again
     * at every tick until it is out: a pcall of the script may catch one. */
    if (j->interrupt || j->failure >= 0)
        luaL_error(L, "%s", j->interrupt ? "interrupted: the worker is stopping" : "job failed");
    double t = wr_clock();
    if (t - j->resumed_at < WR_SLICE_SECONDS) return;
    if (j->expires > 0 && sched_clock(j->sched) >= j->expires) {
        char why[96];
        time_out(j, why, sizeof why);
        luaL_error(L, "job failed: %s", why);
    }
    if (L == j->co && lua_isyieldable(L)) {
        make_ready(j);
        lua_yield(L, 0); /* from a hook: the yield happens once the hook returns */
        return;
    }
    /* A nested coroutine, or behind a C function (a sort comparator, a gsub
     * callback, a metamethod): no yield is possible, so the host does its
     * urgent work from here, and may ask for the job to end. */
    j->resumed_at = t;
    const wr_ctx *ctx = j->vm->ctx;
    if (ctx && ctx->urgent && ctx->urgent(ctx->urgent_ud)) {
        j->interrupt = true;
        luaL_error(L, "interrupted: the worker is stopping");
    }
}

void wr_job_install_hook(lua_State *L) {
    lua_sethook(L, wr_job_hook, LUA_MASKCOUNT, WR_HOOK_COUNT);
}

wr_sched *wr_sched_new(struct ev_loop *loop, wr_job_done_fn done, void *ud) {
    wr_sched *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->loop = loop;
    s->done = done;
    s->ud = ud;
    ev_idle_init(&s->idle, idle_cb);
    ev_check_init(&s->check, check_cb);
    s->idle.data = s->check.data = s;
    return s;
}

void wr_sched_free(wr_sched *s) {
    if (!s) return;
    ev_idle_stop(s->loop, &s->idle);
    ev_check_stop(s->loop, &s->check);
    while (s->spare) {
        wr_job *j = s->spare;
        s->spare = j->next;
        free(j);
    }
    free(s);
}

void wr_sched_set_virtual_time(wr_sched *s, bool on) {
    s->virtual_time = on;
}

void wr_sched_set_job_timeout(wr_sched *s, double seconds) {
    s->job_timeout = seconds;
}

size_t wr_sched_running(const wr_sched *s) {
    return s->running;
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    wr_job *j = w->data;
    j->wait = WR_WAIT_NONE;
    run(j, 0);
}

static void deadline_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    char why[96];
    time_out(w->data, why, sizeof why);
}

/* What prepare makes in a protected call: every allocation of a job's start
 * (its coroutine, the body, the msg table) happens there, so running out of
 * memory or a message the host cannot convert is an error, never a panic. */
typedef struct start_args {
    wr_vm *vm;
    const wr_delivery *d;
    lua_State *co;
    int ref;
} start_args;

static int prepare(lua_State *L) {
    start_args *a = lua_touserdata(L, 1);
    luaL_checkstack(L, 4, "starting a job");
    lua_rawgeti(L, LUA_REGISTRYINDEX, a->vm->handle_ref);
    if (a->vm->handle_by_queue) { /* the loader's own table: no metamethods */
        const char *queue = a->d->queue;
        if (!queue)
            return luaL_error(L, "the script has a handler per queue: name the message's queue "
                                 "(warren try --queue, or \"queue\" in a fixture)");
        lua_getfield(L, -1, queue);
        if (!lua_isfunction(L, -1))
            return luaL_error(L, "the script has no handler for queue '%s'", queue);
        lua_remove(L, -2);
    }
    lua_pushlstring(L, a->d->body.bytes, a->d->body.len);
    wr_push_msg(L, a->d);
    if (a->d->queue) { /* the queue it came from */
        lua_pushstring(L, a->d->queue);
        lua_setfield(L, -2, "queue");
    }
    if (a->vm->nidle > 0) { /* a finished job's coroutine, empty and ready */
        wr_vm_thread t = a->vm->idle[--a->vm->nidle];
        a->co = t.co;
        a->ref = t.ref;
        lua_xmove(L, a->co, 3);
        return 0;
    }
    a->co = lua_newthread(L);
    lua_insert(L, -4);
    lua_xmove(L, a->co, 3);
    a->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

int wr_job_start(wr_sched *s, wr_vm *vm, wr_delivery *d, char *err, size_t errlen) {
    lua_State *L = vm->L;
    start_args a = {vm, d, NULL, LUA_NOREF};
    if (!lua_checkstack(L, 2)) {
        snprintf(err, errlen, "not enough memory");
        return -1;
    }
    lua_pushcfunction(L, prepare);
    lua_pushlightuserdata(L, &a);
    int rc = lua_pcall(L, 1, 0, 0);
    if (rc != LUA_OK) {
        snprintf(err, errlen, "%s", lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "error");
        lua_pop(L, 1);
        return rc == LUA_ERRMEM ? -1 : -2;
    }
    wr_job *j = s->spare;
    if (j) {
        s->spare = j->next;
        s->nspare--;
        memset(j, 0, sizeof *j);
    } else {
        j = calloc(1, sizeof *j);
    }
    if (!j) {
        luaL_unref(L, LUA_REGISTRYINDEX, a.ref);
        snprintf(err, errlen, "not enough memory");
        return -1;
    }
    j->co = a.co;
    j->co_ref = a.ref;
    j->sched = s;
    j->vm = vm;
    j->delivery = d;
    j->decided = -1;
    j->failure = -1;
    j->started = wr_clock();
    wr_vm_ref(vm);
    *job_slot(j->co) = j;
    ev_timer_init(&j->timer, timer_cb, 0, 0);
    ev_timer_init(&j->deadline, deadline_cb, s->job_timeout, 0);
    j->timer.data = j->deadline.data = j;
    if (s->job_timeout > 0) {
        ev_now_update(s->loop); /* counted from now, not from the loop's last wake-up */
        ev_timer_start(s->loop, &j->deadline);
        j->expires = sched_clock(s) + s->job_timeout; /* for the hook, when the loop cannot run */
    }
    j->next = s->jobs;
    if (s->jobs) s->jobs->prev = j;
    s->jobs = j;
    s->running++;
    run(j, 2);
    return 0;
}

/* Keeps the first error of the job, without its traceback, for
 * wr_job_error. */
static void keep_error(wr_job *j, const char *detail) {
    if (j->error) return;
    const char *end = strstr(detail, "\nstack traceback:");
    j->error = strndup(detail, end ? (size_t)(end - detail) : strlen(detail));
}

/* Logs "job ID (tag N) WHAT: DETAIL". */
static void log_failure(const wr_job *j, const char *what, const char *detail) {
    wr_log_job f = wr_delivery_log_fields(j->delivery, j->vm->version);
    wr_log_for(WR_LOG_ERROR, &f, "%s: %s", what, detail);
}

/* The error (argument 2) with the traceback of the coroutine (argument 1),
 * as a string. Runs protected: __tostring is the script's own code. */
static int describe(lua_State *L) {
    lua_State *co = lua_tothread(L, 1);
    const char *msg = luaL_tolstring(L, 2, NULL);
    luaL_traceback(L, co, msg, 0);
    return 1;
}

/* Logs a failed job with the error and the coroutine's traceback. The error
 * object is the script's: turning it into text may fail (a __tostring that
 * raises), which is logged instead. */
static void report_error(wr_job *j) {
    lua_State *L = j->vm->L, *co = j->co;
    if (!lua_checkstack(L, 3) || !lua_checkstack(co, 2)) {
        log_failure(j, "failed", "(not enough memory to describe the error)");
        keep_error(j, "(not enough memory to describe the error)");
        return;
    }
    lua_pushcfunction(L, describe);
    lua_pushthread(co);
    lua_xmove(co, L, 1);
    lua_pushvalue(co, -1);
    lua_xmove(co, L, 1);
    const char *detail = lua_pcall(L, 2, 1, 0) == LUA_OK
                             ? lua_tostring(L, -1)
                             : "(an error whose description itself failed)";
    log_failure(j, "failed", detail);
    keep_error(j, detail);
    lua_pop(L, 1);
}

/* Resumes the job's coroutine with the nargs values on top of its stack (the
 * first time: handle, body, msg). The count must be exact: after a yield
 * from the count hook, the stack below belongs to the running function. */
static void run(wr_job *j, int nargs) {
    lua_State *co = j->co;
    int nres;
    j->wait = WR_WAIT_NONE;
    j->resumed_at = wr_clock();
    j->running = true;
    wr_sched *s = j->sched, *was_active = active;
    wr_job *was_current = s->current;
    active = s;
    s->current = j;
    bool limited = wr_vm_limit_memory(j->vm, true);
    int status = lua_resume(co, NULL, nargs, &nres);
    wr_vm_limit_memory(j->vm, limited);
    s->current = was_current;
    active = was_active;
    j->running = false;
    if (j->interrupt) { /* ended from the hook: the forced stage */
        finish(j, WR_OUT_INTERRUPTED, status != LUA_OK && status != LUA_YIELD);
        return;
    }
    if (j->failure >= 0) { /* failed from a hook (wr_job_fail): that is how it ends */
        finish(j, WR_OUT_FAILED, status != LUA_OK && status != LUA_YIELD);
        return;
    }
    if (status == LUA_YIELD) {
        lua_pop(co, nres);
        /* A bare coroutine.yield() in handle: treat it as giving up a slice. */
        if (j->wait == WR_WAIT_NONE) make_ready(j);
        return;
    }
    if (status == LUA_OK) {
        j->ended = true;
        finish(j, j->decided >= 0 ? (wr_outcome)j->decided : WR_OUT_ACK, false);
        return;
    }
    if (status == LUA_ERRMEM) {
        /* No traceback: building one needs the memory that just ran out. */
        j->failure = WR_FAIL_MEMORY;
        log_failure(j, "failed", "not enough memory");
        keep_error(j, "not enough memory");
    } else {
        j->failure = WR_FAIL_ERROR;
        report_error(j);
    }
    finish(j, WR_OUT_FAILED, true);
}

/* Closes the coroutine so its pending <close> variables run; a failing
 * closer is logged, not propagated. After the job failed, Lua returns the
 * job's own error again, which was logged already, unless a closer raised
 * another: the error the job failed with is kept aside to tell them apart. */
static void close_coroutine(wr_job *j, bool failed) {
    lua_State *L = j->vm->L, *co = j->co;
    bool kept = failed && lua_checkstack(L, 2) && lua_checkstack(co, 1) && lua_gettop(co) > 0;
    if (kept) {
        lua_pushvalue(co, -1);
        lua_xmove(co, L, 1);
    }
    if (lua_resetthread(co) != LUA_OK) {
        bool same = false;
        if (kept) {
            lua_pushvalue(co, -1);
            lua_xmove(co, L, 1);
            same = lua_rawequal(L, -1, -2);
            lua_pop(L, 1);
        }
        if (!same)
            log_failure(j, "closing",
                        lua_type(co, -1) == LUA_TSTRING
                            ? lua_tostring(co, -1)
                            : "a <close> handler raised an error that is not a string");
    }
    if (kept) lua_pop(L, 1);
}

static void finish(wr_job *j, wr_outcome outcome, bool failed) {
    wr_sched *s = j->sched;
    j->closing = true; /* <close> handlers may not wait any more */
    ev_timer_stop(s->loop, &j->timer);
    ev_timer_stop(s->loop, &j->deadline);
    unready(j);
    if (j->cancel) {
        wr_wait_cancel cancel = j->cancel;
        j->cancel = NULL;
        cancel(j, j->wait_data);
    }
    /* A coroutine that returned has nothing left to close: it is kept, as
     * it is, for another job of its version. */
    bool returned = j->ended;
    if (!returned) close_coroutine(j, failed);
    *job_slot(j->co) = NULL;
    if (j->prev)
        j->prev->next = j->next;
    else
        s->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    s->running--;
    s->done(s->ud, j, outcome);
    if (!returned || wr_vm_keep_thread(j->vm, j->co, j->co_ref))
        luaL_unref(j->vm->L, LUA_REGISTRYINDEX, j->co_ref);
    wr_vm_unref(j->vm);
    free(j->error);
    if (s->nspare < SPARE_JOBS) {
        j->next = s->spare;
        s->spare = j;
        s->nspare++;
    } else {
        free(j);
    }
}

void wr_sched_interrupt_all(wr_sched *s) {
    while (s->jobs)
        finish(s->jobs, WR_OUT_INTERRUPTED, false);
}

void wr_job_wait(wr_job *j, wr_wait why, wr_wait_cancel cancel, void *data) {
    j->wait = why;
    j->cancel = cancel;
    j->wait_data = data;
}

void wr_job_resume(wr_job *j, int nargs) {
    j->cancel = NULL;
    j->wait_data = NULL;
    run(j, nargs);
}

void wr_job_resume_results(wr_job *j, int n, const char *what) {
    if (n >= 0) {
        wr_job_resume(j, n);
        return;
    }
    char why[96];
    snprintf(why, sizeof why, "not enough memory for the result of %s", what);
    wr_job_fail(j, WR_FAIL_MEMORY, why);
}

int wr_job_results(wr_job *j, lua_CFunction push, void *ud) {
    lua_State *L = j->vm->L;
    int top = lua_gettop(L);
    if (lua_checkstack(L, 2)) {
        lua_pushcfunction(L, push);
        lua_pushlightuserdata(L, ud);
        if (lua_pcall(L, 1, LUA_MULTRET, 0) == LUA_OK) {
            int n = lua_gettop(L) - top;
            if (lua_checkstack(j->co, n)) {
                lua_xmove(L, j->co, n);
                return n;
            }
        }
    }
    lua_settop(L, top);
    j->cancel = NULL;
    j->wait_data = NULL;
    return -1;
}

/* A sleep under virtual time: over at the next loop turn, the clock moved
 * on by its length; one that reaches the job's limit ends the job there. */
static int skip_sleep(lua_State *L, wr_job *j, double seconds) {
    wr_sched *s = j->sched;
    double now = sched_clock(s);
    if (j->expires > 0 && now + seconds >= j->expires) {
        s->skipped += j->expires - now;
        char why[96];
        time_out(j, why, sizeof why); /* running: the error below ends it */
        return luaL_error(L, "job failed: %s", why);
    }
    s->skipped += seconds;
    if (j->expires > 0) { /* the real timer, moved up by the skip */
        ev_timer_stop(s->loop, &j->deadline);
        ev_timer_set(&j->deadline, j->expires - sched_clock(s), 0);
        ev_timer_start(s->loop, &j->deadline);
    }
    j->wait = WR_WAIT_SLEEP;
    ev_timer_set(&j->timer, 0, 0);
    ev_timer_start(s->loop, &j->timer);
    return lua_yield(L, 0);
}

int wr_job_sleep(lua_State *L, wr_job *j, double seconds) {
    if (j->sched->virtual_time) return skip_sleep(L, j, seconds);
    j->wait = WR_WAIT_SLEEP;
    /* Timers count from the loop's cached time, which is as old as this
     * loop turn (or the script load, in `warren try`): refresh it so a
     * sleep never ends early. */
    ev_now_update(j->sched->loop);
    ev_timer_set(&j->timer, seconds, 0);
    ev_timer_start(j->sched->loop, &j->timer);
    return lua_yield(L, 0);
}

bool wr_job_fail(wr_job *j, wr_failure kind, const char *why) {
    if (j->failure < 0) {
        j->failure = (int)kind;
        log_failure(j, kind == WR_FAIL_TIMEOUT ? "timed out" : "failed", why);
        keep_error(j, why);
    }
    if (j->running) return false;
    finish(j, WR_OUT_FAILED, false);
    return true;
}

wr_failure wr_job_failure(const wr_job *j) {
    return (wr_failure)j->failure;
}

void wr_job_decide(wr_job *j, wr_outcome outcome) {
    j->decided = (int)outcome;
}
