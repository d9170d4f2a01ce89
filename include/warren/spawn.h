/* Child processes for jobs: warren.spawn runs a program, the job waits
 * without blocking the loop, and every child is accounted for: an
 * interrupted job's children are terminated and reaped, never orphaned. */
#ifndef WARREN_SPAWN_H
#define WARREN_SPAWN_H

#include <lua.h>

/* Bytes kept of each of stdout and stderr; the rest is read and dropped. */
#define WR_SPAWN_CAPTURE_MAX (1 << 20)
/* Seconds between SIGTERM and SIGKILL, after a timeout or an interruption. */
#define WR_SPAWN_KILL_GRACE 1.0

/* warren.spawn(argv [, opts]) -> result | nil, err
 *
 * argv: a non-empty list of strings (numbers are converted): the program,
 * looked up in PATH like execvp, and its arguments; no shell is involved.
 * opts (all optional; an unknown key is an error):
 *   stdin    string written to the child's stdin, then closed (default: /dev/null)
 *   env      table of variables added to warren's environment; a false value
 *            removes the variable
 *   cwd      directory the child starts in
 *   timeout  seconds (> 0): then SIGTERM to the child's process group, and
 *            SIGKILL WR_SPAWN_KILL_GRACE seconds later
 *
 * The job yields until the child has exited and its stdout and stderr have
 * reached end of file (a background process that keeps them open is waited
 * for too, up to the timeout). The result table holds:
 *   ok         true when the child exited with status 0 and did not time out
 *   status     the exit status, or nil when a signal ended it
 *   signal     the number of the signal that ended it, or nil
 *   stdout     what it wrote, up to WR_SPAWN_CAPTURE_MAX bytes
 *   stderr     likewise
 *   truncated  true when either stream went over the bound
 *   timed_out  true when the timeout expired
 * When the program cannot be started (not found, not executable, cwd
 * missing, no processes left) it returns nil and a message, without
 * yielding. Bad arguments, or a call outside a job's own coroutine or where
 * it cannot yield, raise an error.
 *
 * The child runs in its own process group with all signals unblocked and at
 * their default dispositions, and inherits no descriptor but 0, 1 and 2. When
 * the job is interrupted, the group gets SIGTERM, then SIGKILL after the
 * grace. The child is watched through a pidfd (Linux 5.3) and only its own
 * pid is reaped: the loop must not be libev's default loop, whose SIGCHLD
 * handler reaps every child (and so steals io.popen's exit status).
 *
 * Its upvalue is the vm (vm.h) whose context has the loop, as for every
 * function of the warren module. */
int wr_spawn_lua(lua_State *L);

/* Ends every child still alive (those of interrupted jobs in their grace):
 * a last short wait for SIGTERM to work, then SIGKILL to each process group,
 * and reaps them. Call once the loop has stopped and every job has ended,
 * before the loop is destroyed. Blocks for about a quarter of a second at
 * most unless a child is stuck in the kernel. */
void wr_spawn_shutdown(void);

#endif
