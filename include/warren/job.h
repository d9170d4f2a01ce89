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

/* Lua that computes without waiting hands the loop a turn after this long,
 * so signals, timers and heartbeats are served. */
#define WR_SLICE_SECONDS 0.010
/* Instructions between two looks at the clock by a count hook. */
#define WR_HOOK_COUNT 10000

/* Seconds on the monotonic clock, as slices and job timeouts count them. */
double wr_clock(void);

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
    WR_WAIT_HTTP,    /* warren.http: a transfer on the loop's curl multi handle */
} wr_wait;

typedef struct wr_sched wr_sched;
typedef struct wr_job wr_job;

/* Undoes a wait when its job is interrupted: stops watchers, releases what
 * the wait holds. It must not resume the job. */
typedef void (*wr_wait_cancel)(wr_job *j, void *data);

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

/* Virtual time (`warren try --virtual-time`): a sleep ends on the next loop
 * turn and moves a virtual clock on by its length instead; --job-timeout
 * counts on that clock, so a sleep past a job's limit ends it as a timeout
 * there. Computation and programs still take their real time. */
void wr_sched_set_virtual_time(wr_sched *s, bool on);

size_t wr_sched_running(const wr_sched *s);

/* The job's monotonic clock, in seconds: wr_clock plus the sleeps that
 * virtual time skipped so far (warren.monotonic). */
double wr_job_clock(const wr_job *j);

/* The job whose coroutine L is, or NULL (main chunk, nested coroutine). */
wr_job *wr_job_current(lua_State *L);

/* The job whose own coroutine L is; raises a Lua error naming warren.fn when
 * L is not a job's own coroutine (load time, a nested coroutine). */
wr_job *wr_job_need(lua_State *L, const char *fn);

/* The wait protocol, checked before a wait arms anything: the job whose own
 * coroutine L is, which can yield and is not closing; else raises a Lua
 * error naming warren.fn, and nothing was started. */
wr_job *wr_job_need_wait(lua_State *L, const char *fn);

/* The message of the job, the version it runs, and when it started
 * (wr_clock). */
wr_delivery *wr_job_delivery(const wr_job *j);
double wr_job_started(const wr_job *j);

/* Why the job failed, without a traceback: the error, "not enough memory",
 * "ran longer than ..."; NULL when it did not fail. */
const char *wr_job_error(const wr_job *j);
unsigned wr_job_version(const wr_job *j);

/* Suspends the job for seconds; call as `return wr_job_sleep(...)` from a
 * C function of the job's coroutine. */
int wr_job_sleep(lua_State *L, wr_job *j, double seconds);

/* Records why the job is about to yield and how to undo the wait if it is
 * interrupted. Call just before `return lua_yield(L, 0)`. */
void wr_job_wait(wr_job *j, wr_wait why, wr_wait_cancel cancel, void *data);

/* Resumes a waiting job with the nargs values wr_job_results gave it. The
 * job may finish (and be freed) before this returns. */
void wr_job_resume(wr_job *j, int nargs);

/* Ends a wait with the n values of wr_job_results: resumes the job, or when
 * n < 0 fails it as out of memory for "the result of WHAT". */
void wr_job_resume_results(wr_job *j, int n, const char *what);

/* Builds the values a waiting job is to be resumed with, in protected mode:
 * push runs on the main thread of the job's state with ud as its one
 * (light userdata) argument, and what it returns is moved onto the job's
 * coroutine. Returns how many, for wr_job_resume. Returns -1 when memory
 * ran out; the wait is then over (its data is the caller's to release) and
 * the caller ends the job with wr_job_fail(j, WR_FAIL_MEMORY, ...). */
int wr_job_results(wr_job *j, lua_CFunction push, void *ud);

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
 * impossible (a nested coroutine, behind a C function) it calls the urgent
 * work of the job's context (context.h) instead, and ends the job with an error when asked to, or
 * when its --job-timeout has passed. */
void wr_job_hook(lua_State *L, lua_Debug *ar);

#endif
