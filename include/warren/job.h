/* Jobs: one coroutine per message, resumed by the event loop. A job waits
 * only at points the host knows (a sleep timer, a time slice); before it
 * yields it records why, and an interrupted job has its waiters stopped and
 * its coroutine closed (running its <close> variables) before it is freed. */
#ifndef WARREN_JOB_H
#define WARREN_JOB_H

#include <ev.h>
#include <lua.h>
#include <stdbool.h>
#include <stddef.h>

#include "warren/delivery.h"
#include "warren/policy.h"
#include "warren/vm.h"

typedef enum {
    WR_OUT_ACK,
    WR_OUT_REQUEUE,
    WR_OUT_REJECT,
    WR_OUT_INTERRUPTED, /* cut off at a wait point: nothing was decided */
    WR_OUT_FAILED,      /* an error, out of memory, a timeout: see wr_job_failure */
} wr_outcome;

typedef enum {
    WR_WAIT_NONE,
    WR_WAIT_SLEEP,   /* warren.sleep: the job's timer */
    WR_WAIT_SLICE,   /* gave up a time slice; resumed on the next loop turn */
    WR_WAIT_CHILD,   /* warren.spawn: a child process */
    WR_WAIT_CONFIRM, /* warren.publish: the broker's confirm */
} wr_wait;

typedef struct wr_sched wr_sched;
typedef struct wr_job wr_job;
struct wr_config;
struct wr_publisher;

/* Undoes a wait when its job is interrupted: stops watchers, releases what
 * the wait holds. It must not resume the job. */
typedef void (*wr_wait_cancel)(wr_job *j, void *data);

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
    double expires;    /* monotonic time of its --job-timeout, 0 for none */
    double resumed_at;
    wr_job *prev, *next; /* all running jobs */
    wr_job *next_ready;  /* jobs to resume on the next loop turn */
};

/* Called once per job when it ends, before it is freed. The delivery is
 * still the caller's to settle and release. */
typedef void (*wr_job_done_fn)(void *ud, wr_job *job, wr_outcome outcome);

/* Creates a scheduler on loop. Returns NULL when out of memory. */
wr_sched *wr_sched_new(struct ev_loop *loop, wr_job_done_fn done, void *ud);

/* Frees the scheduler; there must be no job left (interrupt them first). */
void wr_sched_free(wr_sched *s);

/* Starts handle(body, msg) of vm in a new coroutine and runs it to its first
 * wait. done may be called before this returns. Returns 0; -1 when out of
 * memory (hand the message back); or -2 when the message cannot be given to
 * a job at all (headers nested too deep: reject it). On failure done is not
 * called and err says why. */
int wr_job_start(wr_sched *s, wr_vm *vm, wr_delivery *d, char *err, size_t errlen);

/* Interrupts every job at its wait point: waiters stop, <close> variables
 * run, and done is called with WR_OUT_INTERRUPTED. */
void wr_sched_interrupt_all(wr_sched *s);

/* Seconds a job may run before it fails as WR_FAIL_TIMEOUT; 0 = no limit.
 * Applies to jobs started from now on. */
void wr_sched_set_job_timeout(wr_sched *s, double seconds);

/* What jobs may use beyond the loop: the configuration and the publisher
 * (NULL in `warren try`, where publishing is only logged). */
void wr_sched_set_context(wr_sched *s, const struct wr_config *cfg, struct wr_publisher *pub);
const struct wr_config *wr_sched_config(const wr_sched *s);
struct wr_publisher *wr_sched_publisher(const wr_sched *s);

size_t wr_sched_running(const wr_sched *s);
void wr_sched_set_draining(wr_sched *s, bool draining);
bool wr_sched_draining(const wr_sched *s);
struct ev_loop *wr_sched_loop(const wr_sched *s);

/* The job whose coroutine L is, or NULL (main chunk, nested coroutine). */
wr_job *wr_job_current(lua_State *L);

/* Suspends the job for seconds; call as `return wr_job_sleep(...)` from a
 * C function of the job's coroutine. */
int wr_job_sleep(lua_State *L, wr_job *j, double seconds);

/* Records why the job is about to yield and how to undo the wait if it is
 * interrupted. Call just before `return lua_yield(L, 0)`. */
void wr_job_wait(wr_job *j, wr_wait why, wr_wait_cancel cancel, void *data);

/* Resumes a waiting job with nargs values the caller pushed onto j->co. The
 * job may finish (and be freed) before this returns. */
void wr_job_resume(wr_job *j, int nargs);

/* Ends the job as a failure of the given kind, logged with why ("ran
 * longer than ..."); --job-timeout uses it. A waiting job ends at once: its
 * wait is cancelled (timer stopped, child ended, publish forgotten), its
 * <close> variables run, and done is called with WR_OUT_FAILED; true is
 * returned and j is gone. Called while the job's coroutine runs (from a
 * hook), it only records the failure and returns false: the caller must then
 * raise an error in the running coroutine, and however the job ends next
 * (that error, or a return after a pcall caught it) it ends as this failure. */
bool wr_job_fail(wr_job *j, wr_failure kind, const char *why);

/* How the job failed; meaningful in done when the outcome is WR_OUT_FAILED. */
wr_failure wr_job_failure(const wr_job *j);

/* Records the script's explicit decision, applied when handle returns. */
void wr_job_decide(wr_job *j, wr_outcome outcome);

/* Installs the time-slice hook on a fresh state, inherited by its threads. */
void wr_job_install_hook(lua_State *L);

/* The count hook (installed by wr_job_install_hook): every 10 ms of a job's
 * computation it yields the job's own coroutine to the loop; where that is
 * impossible (a nested coroutine, behind a C function) it calls the host's
 * urgent work instead, and ends the job with an error when asked to, or
 * when its --job-timeout has passed. */
void wr_job_hook(lua_State *L, lua_Debug *ar);

/* The host's urgent work while a job computes where it cannot yield: keep
 * connections alive, look at signals. Returns true when the running job
 * must end now (the forced stage). Must not call back into jobs. */
typedef bool (*wr_urgent_fn)(void *ud);
void wr_sched_set_urgent(wr_sched *s, wr_urgent_fn fn, void *ud);

#endif
