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
#include "warren/vm.h"

typedef enum {
    WR_OUT_ACK,
    WR_OUT_REQUEUE,
    WR_OUT_REJECT,
    WR_OUT_INTERRUPTED, /* cut off at a wait point: nothing was decided */
} wr_outcome;

typedef enum { WR_WAIT_NONE, WR_WAIT_SLEEP, WR_WAIT_SLICE } wr_wait;

typedef struct wr_sched wr_sched;
typedef struct wr_job wr_job;

struct wr_job {
    wr_sched *sched;
    wr_vm *vm;
    lua_State *co;
    int co_ref; /* registry reference in vm->L that keeps co alive */
    wr_delivery *delivery;
    wr_wait wait;
    ev_timer timer;
    int decided; /* a wr_outcome chosen by the script, or -1 */
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
 * wait. done may be called before this returns. Returns 0, or -1 when the
 * job could not be created (out of memory): done is then not called. */
int wr_job_start(wr_sched *s, wr_vm *vm, wr_delivery *d);

/* Interrupts every job at its wait point: waiters stop, <close> variables
 * run, and done is called with WR_OUT_INTERRUPTED. */
void wr_sched_interrupt_all(wr_sched *s);

size_t wr_sched_running(const wr_sched *s);
void wr_sched_set_draining(wr_sched *s, bool draining);
bool wr_sched_draining(const wr_sched *s);
struct ev_loop *wr_sched_loop(const wr_sched *s);

/* The job whose coroutine L is, or NULL (main chunk, nested coroutine). */
wr_job *wr_job_current(lua_State *L);

/* Suspends the job for seconds; call as `return wr_job_sleep(...)` from a
 * C function of the job's coroutine. */
int wr_job_sleep(lua_State *L, wr_job *j, double seconds);

/* Records the script's explicit decision, applied when handle returns. */
void wr_job_decide(wr_job *j, wr_outcome outcome);

/* Installs the time-slice hook on a fresh state, inherited by its threads. */
void wr_job_install_hook(lua_State *L);

#endif
