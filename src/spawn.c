#define _GNU_SOURCE /* pipe2, close_range, syscall */
#include "warren/spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "warren/context.h"
#include "warren/job.h"
#include "warren/log.h"
#include "warren/lua_api.h"
#include "warren/stats.h"

extern char **environ;

/* How long wr_spawn_shutdown lets terminated children finish on their own. */
#define SHUTDOWN_WAIT 0.25

typedef struct capture {
    ev_io w; /* w.fd is -1 once closed */
    char *data;
    size_t len, cap;
} capture;

typedef struct child {
    struct ev_loop *loop;
    wr_job *job;     /* NULL once the job is gone: the child is only being ended */
    wr_stats *stats; /* counts how it ended; NULL: not counted */
    pid_t pid;       /* also the id of its process group */
    bool exited;     /* reaped, status is valid */
    int status;
    bool terminated; /* the group was sent SIGTERM */
    bool killed;     /* the group was sent SIGKILL */
    bool timed_out;
    bool truncated;
    ev_io exit_w;   /* on the child's pidfd, readable once it has exited; fd -1 once closed */
    ev_timer timer; /* the timeout, then the grace before SIGKILL */
    capture out, err;
    ev_io in; /* in.fd is -1 once closed */
    char *input;
    size_t input_len, input_off;
    struct child *prev, *next;
} child;

/* Every child whose job waits for it, and the children of interrupted jobs
 * until both their leader is reaped and their group has been sent SIGKILL. */
static child *children;

/* Where the child failed before exec, reported through a close-on-exec pipe. */
typedef struct exec_report {
    int in_chdir;
    int err;
} exec_report;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void close_capture(child *c, capture *cap) {
    if (cap->w.fd < 0) return;
    ev_io_stop(c->loop, &cap->w);
    close(cap->w.fd);
    ev_io_set(&cap->w, -1, EV_READ);
}

static void close_input(child *c) {
    if (c->in.fd < 0) return;
    ev_io_stop(c->loop, &c->in);
    close(c->in.fd);
    ev_io_set(&c->in, -1, EV_WRITE);
    free(c->input);
    c->input = NULL;
}

static void close_exit_watch(child *c) {
    if (c->exit_w.fd < 0) return;
    ev_io_stop(c->loop, &c->exit_w);
    close(c->exit_w.fd);
    ev_io_set(&c->exit_w, -1, EV_READ);
}

/* Stops everything the record holds and frees it; the child must have been
 * reaped, or be about to be (wr_spawn_shutdown). */
static void free_child(child *c) {
    close_capture(c, &c->out);
    close_capture(c, &c->err);
    close_input(c);
    close_exit_watch(c);
    ev_timer_stop(c->loop, &c->timer);
    free(c->out.data);
    free(c->err.data);
    if (c->prev)
        c->prev->next = c->next;
    else
        children = c->next;
    if (c->next) c->next->prev = c->prev;
    free(c);
}

/* Signals the child's whole process group. The kernel does not reuse the id
 * while the leader, even as a zombie, or any member is alive. */
static void signal_group(child *c, int sig) {
    if (kill(-c->pid, sig) != 0 && errno != ESRCH)
        wr_warn("cannot send signal %d to child group %d: %s", sig, (int)c->pid, strerror(errno));
}

/* Sends SIGTERM to the group and arms SIGKILL after the grace. */
static void terminate(child *c) {
    c->terminated = true;
    signal_group(c, SIGTERM);
    ev_timer_stop(c->loop, &c->timer);
    ev_timer_set(&c->timer, WR_SPAWN_KILL_GRACE, 0);
    ev_timer_start(c->loop, &c->timer);
}

static void push_capture(lua_State *L, const capture *cap, const char *name) {
    lua_pushlstring(L, cap->data ? cap->data : "", cap->len);
    lua_setfield(L, -2, name);
}

/* Protected (wr_job_results): the result table of the child (argument 1). */
static int push_result(lua_State *L) {
    const child *c = lua_touserdata(L, 1);
    lua_createtable(L, 0, 7);
    bool exited = WIFEXITED(c->status);
    lua_pushboolean(L, exited && WEXITSTATUS(c->status) == 0 && !c->timed_out);
    lua_setfield(L, -2, "ok");
    if (exited) {
        lua_pushinteger(L, WEXITSTATUS(c->status));
        lua_setfield(L, -2, "status");
    } else if (WIFSIGNALED(c->status)) {
        lua_pushinteger(L, WTERMSIG(c->status));
        lua_setfield(L, -2, "signal");
    }
    push_capture(L, &c->out, "stdout");
    push_capture(L, &c->err, "stderr");
    lua_pushboolean(L, c->truncated);
    lua_setfield(L, -2, "truncated");
    lua_pushboolean(L, c->timed_out);
    lua_setfield(L, -2, "timed_out");
    return 1;
}

/* Resumes the job with the result table once the child has exited and both
 * pipes have reached end of file. */
static void maybe_done(child *c) {
    if (!c->job || !c->exited || c->out.w.fd >= 0 || c->err.w.fd >= 0) return;
    wr_job *j = c->job;
    if (c->stats) {
        if (WIFEXITED(c->status) && WEXITSTATUS(c->status) == 0 && !c->timed_out)
            c->stats->spawns_ok++;
        else
            c->stats->spawns_failed++;
    }
    int n = wr_job_results(j, push_result, c);
    free_child(c);
    wr_job_resume_results(j, n, "warren.spawn");
}

/* Keeps up to WR_SPAWN_CAPTURE_MAX bytes; beyond that, or when memory runs
 * out, the bytes are dropped and the result marked truncated. */
static void append(child *c, capture *cap, const char *bytes, size_t n) {
    size_t take = WR_SPAWN_CAPTURE_MAX - cap->len;
    if (take > n) take = n;
    if (cap->len + take > cap->cap) {
        size_t want = cap->cap ? cap->cap * 2 : 4096;
        while (want < cap->len + take)
            want *= 2;
        if (want > WR_SPAWN_CAPTURE_MAX) want = WR_SPAWN_CAPTURE_MAX;
        char *grown = realloc(cap->data, want);
        if (!grown) {
            take = 0;
        } else {
            cap->data = grown;
            cap->cap = want;
        }
    }
    if (take) memcpy(cap->data + cap->len, bytes, take);
    cap->len += take;
    if (take < n) c->truncated = true;
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)loop, (void)revents;
    static char buf[65536];
    child *c = w->data;
    capture *cap = w == &c->out.w ? &c->out : &c->err;
    ssize_t n = read(w->fd, buf, sizeof buf);
    if (n > 0) {
        append(c, cap, buf, (size_t)n);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    close_capture(c, cap);
    maybe_done(c);
}

static void write_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)loop, (void)revents;
    child *c = w->data;
    ssize_t n = write(w->fd, c->input + c->input_off, c->input_len - c->input_off);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    /* Done, or the child closed its stdin (EPIPE): either way no more input. */
    if (n > 0) c->input_off += (size_t)n;
    if (n < 0 || c->input_off == c->input_len) close_input(c);
}

/* The pidfd is readable: the child has exited. Only this exact pid is
 * reaped, so children the script starts itself (io.popen, os.execute) keep
 * their exit status for their own wait. */
static void exit_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)loop, (void)revents;
    child *c = w->data;
    int status;
    pid_t r = waitpid(c->pid, &status, WNOHANG);
    if (r == 0 || (r < 0 && errno == EINTR)) return;
    close_exit_watch(c);
    c->exited = true;
    /* ECHILD cannot happen while nothing else reaps our children; were it to,
     * the child is gone and its status unknown: report it as killed. */
    c->status = r < 0 ? SIGKILL : status;
    close_input(c);
    if (c->job)
        maybe_done(c);
    else if (c->killed)
        free_child(c);
    /* Otherwise the grace timer ends what the leader left in its group. */
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    child *c = w->data;
    if (!c->terminated) {
        wr_warn("child %d timed out; sending SIGTERM to its process group", (int)c->pid);
        c->timed_out = true;
        terminate(c);
        return;
    }
    if (!c->exited)
        wr_warn("child %d still runs %g s after SIGTERM; sending SIGKILL to its process group",
                (int)c->pid, WR_SPAWN_KILL_GRACE);
    c->killed = true;
    signal_group(c, SIGKILL);
    if (!c->job) {
        if (c->exited) free_child(c);
        return;
    }
    /* Something outside the group may hold the pipes: stop waiting for them. */
    close_capture(c, &c->out);
    close_capture(c, &c->err);
    maybe_done(c);
}

/* The job is interrupted: its output is dropped, the child's group gets
 * SIGTERM, then SIGKILL after the grace, and the record lives on, detached,
 * until both are done. */
static void cancel_cb(wr_job *j, void *data) {
    (void)j;
    child *c = data;
    c->job = NULL;
    close_capture(c, &c->out);
    close_capture(c, &c->err);
    close_input(c);
    if (c->terminated) return; /* already on its way out, after a timeout */
    wr_debug("job interrupted: sending SIGTERM to child %d and its process group", (int)c->pid);
    terminate(c);
}

/* In the child between fork and exec: only async-signal-safe calls. */
static void exec_child(char *const argv[], char *const envp[], const char *cwd, int in_fd,
                       int out_fd, int err_fd, int report_fd) {
    exec_report r = {0, 0};
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL);
    setpgid(0, 0);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (in_fd < 0) in_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    /* Above 2 first, so that no dup2 overwrites a descriptor still needed. */
    report_fd = fcntl(report_fd, F_DUPFD_CLOEXEC, 3);
    int fds[3] = {fcntl(in_fd, F_DUPFD_CLOEXEC, 3), fcntl(out_fd, F_DUPFD_CLOEXEC, 3),
                  fcntl(err_fd, F_DUPFD_CLOEXEC, 3)};
    for (int i = 0; i < 3; i++)
        if (fds[i] < 0 || dup2(fds[i], i) < 0) goto fail;
    /* Descriptors opened without close-on-exec (by Lua's io library, say). */
    close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
    if (cwd && chdir(cwd) != 0) {
        r.in_chdir = 1;
        goto fail;
    }
    environ = (char **)envp;
    execvp(argv[0], argv);
fail:
    r.err = errno;
    while (write(report_fd, &r, sizeof r) < 0 && errno == EINTR) {
    }
    _exit(127);
}

static void close_pair(int p[2]) {
    for (int i = 0; i < 2; i++)
        if (p[i] >= 0) close(p[i]);
}

/* What l_spawn gathered from its arguments. */
typedef struct request {
    char **argv;
    char **envp;
    const char *cwd;
    const char *input;
    size_t input_len;
    bool has_input;
    double timeout; /* 0: none */
} request;

/* Writes "cannot run 'PROGRAM': [WHAT: ]REASON" into err. */
static void say(char *err, size_t errlen, const request *rq, const char *what, int e) {
    snprintf(err, errlen, "cannot run '%s': %s%s%s", rq->argv[0], what ? what : "",
             what ? ": " : "", strerror(e));
}

/* Starts the child on loop. Returns its record, or NULL
 * with a message in err when the program could not be started. */
static child *start(struct ev_loop *loop, const request *rq, char *err, size_t errlen) {
    int out[2] = {-1, -1}, errp[2] = {-1, -1}, in[2] = {-1, -1}, rep[2] = {-1, -1};
    child *c = calloc(1, sizeof *c);
    char *input = rq->input_len ? malloc(rq->input_len) : NULL;
    if (!c || (rq->input_len && !input)) {
        say(err, errlen, rq, NULL, ENOMEM);
        goto fail;
    }
    if (pipe2(out, O_CLOEXEC) || pipe2(errp, O_CLOEXEC) || pipe2(rep, O_CLOEXEC) ||
        (rq->has_input && pipe2(in, O_CLOEXEC))) {
        say(err, errlen, rq, "pipe", errno);
        goto fail;
    }
    /* Writing stdin to a child that has exited must fail with EPIPE, not kill warren. */
    signal(SIGPIPE, SIG_IGN);
    /* No signal handler of the parent may run in the child before exec. */
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    pid_t pid = fork();
    if (pid == 0) exec_child(rq->argv, rq->envp, rq->cwd, in[0], out[1], errp[1], rep[1]);
    int fork_errno = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        say(err, errlen, rq, "fork", fork_errno);
        goto fail;
    }
    close(rep[1]);
    rep[1] = -1;
    exec_report r;
    ssize_t n;
    while ((n = read(rep[0], &r, sizeof r)) < 0 && errno == EINTR) {
    }
    /* A pidfd tells the loop when this child, and only it, has exited
     * (Linux 5.3); it refers to the process even once it is a zombie. */
    bool exec_failed = n == (ssize_t)sizeof r;
    int pidfd = exec_failed ? -1 : (int)syscall(SYS_pidfd_open, pid, 0);
    int pidfd_errno = errno;
    if (exec_failed || pidfd < 0) {
        if (!exec_failed) kill(pid, SIGKILL);
        /* It exits at once, and nothing but us reaps our children. */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        if (!exec_failed) {
            say(err, errlen, rq, "pidfd_open", pidfd_errno);
        } else if (r.in_chdir) {
            char what[300];
            snprintf(what, sizeof what, "cannot change directory to '%s'", rq->cwd);
            say(err, errlen, rq, what, r.err);
        } else {
            say(err, errlen, rq, NULL, r.err);
        }
        goto fail;
    }
    close_pair(rep);
    close(out[1]);
    close(errp[1]);
    if (in[0] >= 0) close(in[0]);
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(errp[0], F_SETFL, O_NONBLOCK);

    c->loop = loop;
    c->pid = pid;
    ev_io_init(&c->out.w, read_cb, out[0], EV_READ);
    ev_io_init(&c->err.w, read_cb, errp[0], EV_READ);
    ev_io_init(&c->in, write_cb, in[1], EV_WRITE);
    ev_io_init(&c->exit_w, exit_cb, pidfd, EV_READ);
    ev_timer_init(&c->timer, timer_cb, rq->timeout, 0);
    c->out.w.data = c->err.w.data = c->in.data = c->exit_w.data = c->timer.data = c;
    ev_io_start(loop, &c->out.w);
    ev_io_start(loop, &c->err.w);
    ev_io_start(loop, &c->exit_w);
    if (rq->timeout > 0) {
        ev_now_update(loop); /* the timeout counts from now, not from the loop's last wake-up */
        ev_timer_start(loop, &c->timer);
    }
    if (input) {
        fcntl(in[1], F_SETFL, O_NONBLOCK);
        memcpy(input, rq->input, rq->input_len);
        c->input = input;
        c->input_len = rq->input_len;
        ev_io_start(loop, &c->in);
    } else {
        close_input(c); /* empty stdin: end of file at once */
    }
    c->next = children;
    if (children) children->prev = c;
    children = c;
    return c;

fail:
    close_pair(out);
    close_pair(errp);
    close_pair(in);
    close_pair(rep);
    free(input);
    free(c);
    return NULL;
}

/* The value at idx as a C string for argv or envp: a string or a number, without NUL. */
static const char *plain_string(lua_State *L, int idx, const char *what) {
    int t = lua_type(L, idx);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
        luaL_error(L, "warren.spawn: %s must be a string, got %s", what, luaL_typename(L, idx));
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (strlen(s) != len) luaL_error(L, "warren.spawn: %s contains a NUL byte", what);
    return s;
}

/* Pops the string on top of the stack into the anchor table at index 3, which
 * keeps it alive while rq points to it. */
static void anchor(lua_State *L) {
    lua_rawseti(L, 3, (lua_Integer)lua_rawlen(L, 3) + 1);
}

/* Builds rq->envp from environ and the env table at index e: its pairs
 * override or add variables, a false value removes one. */
static void build_env(lua_State *L, int e, request *rq) {
    size_t nbase = 0, nextra = 0;
    while (environ[nbase])
        nbase++;
    lua_pushnil(L);
    while (lua_next(L, e)) {
        size_t klen;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &klen) : NULL;
        if (!k || klen == 0 || strlen(k) != klen || strchr(k, '='))
            luaL_error(L, "warren.spawn: opts.env keys must be variable names (non-empty "
                          "strings without '=')");
        lua_pop(L, 1);
        nextra++;
    }
    char **envp = lua_newuserdatauv(L, (nbase + nextra + 1) * sizeof *envp, 0);
    size_t m = 0;
    lua_pushnil(L);
    while (lua_next(L, e)) {
        if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
            lua_pop(L, 1);
            continue;
        }
        int value = lua_gettop(L);
        const char *v =
            plain_string(L, value, lua_pushfstring(L, "opts.env.%s", lua_tostring(L, -2)));
        lua_pop(L, 1); /* the name pushed for the message */
        envp[m++] = (char *)lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), v);
        anchor(L);
        lua_pop(L, 1);
    }
    for (size_t i = 0; i < nbase; i++) {
        const char *eq = strchr(environ[i], '=');
        lua_pushlstring(L, environ[i], eq ? (size_t)(eq - environ[i]) : strlen(environ[i]));
        if (lua_rawget(L, e) == LUA_TNIL) envp[m++] = environ[i];
        lua_pop(L, 1);
    }
    envp[m] = NULL;
    rq->envp = envp; /* the userdata stays on the stack until l_spawn returns */
}

static const char *const option_names[] = {"stdin", "env", "cwd", "timeout", NULL};

int wr_spawn_lua(lua_State *L) {
    wr_job *j = wr_job_need_wait(L, "spawn");
    luaL_checktype(L, 1, LUA_TTABLE);
    if (lua_isnoneornil(L, 2)) {
        lua_settop(L, 1);
        lua_newtable(L);
    }
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    lua_newtable(L); /* 3: anchors the strings that rq points to */
    request rq = {0};

    lua_Integer n = luaL_len(L, 1);
    luaL_argcheck(L, n >= 1 && (lua_Unsigned)n < (lua_Unsigned)INT_MAX / sizeof(char *), 1,
                  "expected a non-empty list: the program and its arguments");
    rq.argv = lua_newuserdatauv(L, ((size_t)n + 1) * sizeof *rq.argv, 0);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, 1, i);
        int value = lua_gettop(L);
        rq.argv[i - 1] = (char *)plain_string(L, value, lua_pushfstring(L, "argv[%I]", i));
        lua_pop(L, 1);
        anchor(L);
    }
    rq.argv[n] = NULL;

    wr_lua_check_options(L, 2, "spawn", option_names);
    if (lua_getfield(L, 2, "cwd") != LUA_TNIL) {
        rq.cwd = plain_string(L, -1, "opts.cwd");
        anchor(L);
    } else {
        lua_pop(L, 1);
    }
    if (lua_getfield(L, 2, "stdin") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "warren.spawn: opts.stdin must be a string, got %s",
                       luaL_typename(L, -1));
        rq.input = lua_tolstring(L, -1, &rq.input_len);
        rq.has_input = true;
        anchor(L);
    } else {
        lua_pop(L, 1);
    }
    if (lua_getfield(L, 2, "timeout") != LUA_TNIL) {
        lua_Number t = lua_tonumber(L, -1);
        if (lua_type(L, -1) != LUA_TNUMBER || !(t > 0) || !isfinite(t))
            luaL_error(L, "warren.spawn: opts.timeout must be a positive number of seconds");
        rq.timeout = (double)t;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "env") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TTABLE)
            luaL_error(L, "warren.spawn: opts.env must be a table, got %s", luaL_typename(L, -1));
        build_env(L, lua_gettop(L), &rq);
    } else {
        rq.envp = environ;
    }

    char err[512];
    /* The vm, upvalue of the warren module's functions, has the loop. */
    const wr_vm *vm = lua_touserdata(L, lua_upvalueindex(1));
    child *c = start(vm->ctx->loop, &rq, err, sizeof err);
    if (!c && vm->ctx->stats) vm->ctx->stats->spawns_error++;
    if (!c) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    wr_debug("spawned %s as pid %d", rq.argv[0], (int)c->pid);
    c->job = j;
    c->stats = vm->ctx->stats;
    wr_job_wait(j, WR_WAIT_CHILD, cancel_cb, c);
    return lua_yield(L, 0);
}

/* True once the leader has exited (reaped or a zombie), or is not ours to wait for. */
static bool leader_exited(const child *c) {
    if (c->exited) return true;
    siginfo_t info;
    info.si_pid = 0;
    return waitid(P_PID, (id_t)c->pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid;
}

void wr_spawn_shutdown(void) {
    for (child *c = children; c; c = c->next)
        if (!c->terminated) {
            c->terminated = true;
            signal_group(c, SIGTERM);
        }
    double deadline = now() + SHUTDOWN_WAIT;
    for (child *c = children; c && now() < deadline;) {
        if (leader_exited(c))
            c = c->next;
        else
            nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
    int killed = 0;
    while (children) {
        child *c = children;
        if (!leader_exited(c)) killed++;
        signal_group(c, SIGKILL);
        if (!c->exited)
            while (waitpid(c->pid, NULL, 0) < 0 && errno == EINTR) {
            }
        free_child(c);
    }
    if (killed) wr_warn("killed %d child processes that outlived SIGTERM at exit", killed);
}
