#include "warren/load.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/config.h"
#include "warren/job.h"
#include "warren/lua_api.h"

/* The least time a protected look at the loaded chunk gets (finding handle,
 * its modules, describing its error), however little of the limit is left. */
#define MIN_BUDGET 0.1

struct wr_load {
    wr_vm *vm;
    char *script;
    lua_State *co; /* runs the main chunk */
    int co_ref;    /* registry reference in vm->L that keeps co alive */
    double deadline;
    double resumed_at;
    bool ready;
    bool oom;      /* compiling it ran out of memory */
    bool abort;    /* the chunk is being ended: why says how it will fail */
    char why[512]; /* "file:line: ..." for an abort */
};

/* The load whose Lua runs now, for the count hook (one loop thread). */
static wr_load *running;

/* Puts the script's directory first on package.path so a job can require
 * the modules that sit next to it. */
static void set_path(lua_State *L, const char *script) {
    const char *slash = strrchr(script, '/');
    const char *dir = slash ? script : ".";
    size_t dirlen = !slash ? 1 : slash == script ? 1 : (size_t)(slash - script);
    lua_getglobal(L, "package");
    const char *d = lua_pushlstring(L, dir, dirlen);
    lua_getfield(L, -2, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", d, d, lua_tostring(L, -1));
    lua_setfield(L, -4, "path");
    lua_pop(L, 3);
}

/* Marks the load as ending, the first time, with why at the line reached. */
static void abort_at(wr_load *ld, lua_State *L, lua_Debug *ar, const char *why) {
    if (ld->abort) return;
    ld->abort = true;
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
        snprintf(ld->why, sizeof ld->why, "%s:%d: %s", ar->short_src, ar->currentline, why);
    else
        snprintf(ld->why, sizeof ld->why, "%s: %s", ld->script, why);
}

/* Count hook of the state while it loads. The chunk's own coroutine yields
 * to the loop every slice; anywhere else (a nested coroutine, behind a C
 * function, the host's protected looks) the context's urgent work runs
 * instead. Past the deadline, or when the urgent work says so, the chunk
 * is abandoned at its next yield, or unwound by an error raised at every
 * instruction. Coroutines the chunk made keep this hook: once the load is
 * over it serves them as the jobs' hook. */
static void load_hook(lua_State *L, lua_Debug *ar) {
    wr_load *ld = running;
    if (!ld) {
        wr_job_hook(L, ar);
        return;
    }
    double t = wr_clock();
    if (!ld->abort) {
        if (t >= ld->deadline) {
            char why[96];
            snprintf(why, sizeof why,
                     "still loading after %d s (an endless loop at the top level?)",
                     WR_LOAD_TIMEOUT);
            abort_at(ld, L, ar, why);
        } else if (t - ld->resumed_at < WR_SLICE_SECONDS) {
            return;
        }
    }
    if (L == ld->co && lua_isyieldable(L)) {
        lua_yield(L, 0); /* from a hook: the yield happens once the hook returns */
        return;
    }
    if (!ld->abort) {
        ld->resumed_at = t;
        const wr_ctx *ctx = ld->vm->ctx;
        if (!ctx->urgent || !ctx->urgent(ctx->urgent_ud)) return;
        abort_at(ld, L, ar, "stopped while loading: the worker is stopping");
    }
    /* Every instruction from now on raises again, so a pcall of the script
     * that catches this error cannot run on. */
    lua_sethook(L, load_hook, LUA_MASKCOUNT, 1);
    lua_pushstring(L, ld->why);
    lua_error(L);
}

/* Protected: prepares the state for the script and leaves the chunk,
 * compiled, in a coroutine of its own. Argument 1 is the load. */
static int prepare(lua_State *L) {
    wr_load *ld = lua_touserdata(L, 1);
    wr_vm *vm = ld->vm;
    luaL_openlibs(L);
    set_path(L, ld->script);
    wr_lua_open(vm);
    /* Stamped before it is read: a save made during the load shows as a change. */
    if (wr_vm_add_file(vm, ld->script) != 0) return luaL_error(L, "%s: out of memory", ld->script);
    lua_sethook(L, load_hook, LUA_MASKCOUNT, WR_HOOK_COUNT); /* the coroutine inherits it */
    ld->co = lua_newthread(L);
    wr_vm_limit_memory(vm, true);
    int status = luaL_loadfilex(ld->co, ld->script, "t");
    wr_vm_limit_memory(vm, false);
    if (status != LUA_OK) {
        ld->oom = status == LUA_ERRMEM;
        lua_xmove(ld->co, L, 1);
        return lua_error(L);
    }
    ld->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Copies msg into err as one line, without a traceback: a module that does
 * not compile gives two lines ("error loading module ..." and "\tfile:line:
 * ..."); both are kept, and so the line. What does not fit is cut after a
 * whole word, and " ..." says so. */
static void one_line(const char *msg, char *err, size_t errlen) {
    const char *end = strstr(msg, "\nstack traceback:");
    size_t len = end ? (size_t)(end - msg) : strlen(msg);
    size_t o = 0, i = 0;
    for (; i < len && o + 1 < errlen; i++) {
        if (msg[i] != '\n' && msg[i] != '\t')
            err[o++] = msg[i];
        else if (o > 0 && err[o - 1] != ' ')
            err[o++] = ' ';
    }
    if (i < len && errlen > 8) {
        o = o > errlen - 5 ? errlen - 5 : o;
        while (o > 0 && err[o - 1] != ' ')
            o--;
        memcpy(err + o, "...", 4);
        return;
    }
    err[o] = '\0';
}

/* Protected: the error object (argument 1) as text, as lua.c shows it: a
 * string as it is, a value with __tostring through it, else named by its
 * type after where (argument 2) it was raised. */
static int describe(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING) {
        lua_settop(L, 1);
        return 1;
    }
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    lua_pushfstring(L, "%s(error object is a %s value)", lua_tostring(L, 2), luaL_typename(L, 1));
    return 1;
}

/* "file:line: " of the innermost Lua function on co's stack, for an error
 * object that names no place. */
static void where(lua_State *co, char *buf, size_t len) {
    lua_Debug ar;
    buf[0] = '\0';
    for (int level = 0; lua_getstack(co, level, &ar); level++)
        if (lua_getinfo(co, "Sl", &ar) && ar.currentline > 0) {
            snprintf(buf, len, "%s:%d: ", ar.short_src, ar.currentline);
            return;
        }
}

/* Gives the host's protected calls at least MIN_BUDGET, under the hook. */
static void budget(wr_load *ld) {
    double least = wr_clock() + MIN_BUDGET;
    if (!ld->abort && ld->deadline < least) ld->deadline = least;
    ld->resumed_at = wr_clock();
}

/* The error on top of L (the main thread, after a failed protected call)
 * or of co (after the chunk failed) into err, as one line. */
static void take_error(wr_load *ld, lua_State *from, char *err, size_t errlen) {
    lua_State *L = ld->vm->L;
    if (ld->abort) {
        snprintf(err, errlen, "%s", ld->why);
        return;
    }
    char place[300];
    where(from, place, sizeof place);
    if (!lua_checkstack(L, 3) || (from != L && !lua_checkstack(from, 1))) {
        snprintf(err, errlen, "%s: not enough memory", ld->script);
        return;
    }
    int error = lua_gettop(from);
    lua_pushcfunction(L, describe);
    lua_pushvalue(from, error);
    if (from != L) lua_xmove(from, L, 1);
    lua_pushstring(L, place);
    budget(ld);
    running = ld;
    int status = lua_pcall(L, 2, 1, 0);
    running = NULL;
    const char *msg = lua_tostring(L, -1);
    if (status == LUA_OK && msg)
        one_line(msg, err, errlen);
    else
        snprintf(err, errlen, "%s(an error whose description itself failed)", place);
    lua_pop(L, from == L ? 2 : 1);
}

wr_load *wr_load_begin(const char *script, unsigned version, const wr_ctx *ctx, char *err,
                       size_t errlen) {
    wr_load *ld = calloc(1, sizeof *ld);
    if (ld) ld->script = strdup(script);
    if (ld && ld->script) ld->vm = wr_vm_new(version, ctx);
    if (!ld || !ld->vm) {
        if (ld) free(ld->script);
        free(ld);
        snprintf(err, errlen, "%s: out of memory", script);
        return NULL;
    }
    ld->co_ref = LUA_NOREF;
    ld->deadline = wr_clock() + WR_LOAD_TIMEOUT;
    lua_State *L = ld->vm->L;
    lua_pushcfunction(L, prepare);
    lua_pushlightuserdata(L, ld);
    int status = lua_pcall(L, 1, 0, 0);
    if (status != LUA_OK) {
        if ((status == LUA_ERRMEM || ld->oom) && ld->vm->mem.limit)
            snprintf(err, errlen,
                     "%s: not enough memory to load it under the memory limit of %zu MB", script,
                     ld->vm->mem.limit >> 20);
        else
            take_error(ld, L, err, errlen);
        wr_load_end(ld);
        return NULL;
    }
    return ld;
}

/* The queue find_handle found no handler for, or NULL. */
static const char *unhandled;

/* Protected: finds handle in the main chunk's result (argument 2), or else
 * as a global, and references it in the vm (argument 1): a function for
 * every queue, or a table of functions keyed by queue name. A table is
 * copied into one of the loader's own (the script may change its table
 * later, or give it metamethods); each queue of the configuration must
 * have a function there, or unhandled names the first that has none. */
static int find_handle(lua_State *L) {
    wr_vm *vm = lua_touserdata(L, 1);
    unhandled = NULL;
    if (lua_istable(L, 2))
        lua_getfield(L, 2, "handle");
    else
        lua_getglobal(L, "handle");
    if (lua_isfunction(L, -1)) {
        vm->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        return 0;
    }
    if (!lua_istable(L, -1)) return 0;
    int given = lua_gettop(L);
    lua_newtable(L);
    int own = given + 1;
    bool any = false;
    lua_pushnil(L);
    while (lua_next(L, given)) {
        if (lua_type(L, -2) == LUA_TSTRING && lua_isfunction(L, -1)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, own);
            any = true;
        } else {
            lua_pop(L, 1);
        }
    }
    const struct wr_config *cfg = vm->ctx->cfg;
    for (size_t i = 0; cfg && i < cfg->nqueues; i++) {
        const char *name = cfg->queues[i].name;
        lua_getfield(L, given, name); /* __index counts too */
        if (!lua_isfunction(L, -1)) {
            unhandled = name;
            return 0;
        }
        lua_setfield(L, own, name);
        any = true;
    }
    if (!any) return 0;
    vm->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    vm->handle_by_queue = true;
    return 0;
}

/* Protected: records every module loaded from the script's directory (the
 * first two entries of package.path), so the host can watch them. The vm
 * is argument 1. A script without a usable package table has no modules to
 * watch. */
static int collect_modules(lua_State *L) {
    wr_vm *vm = lua_touserdata(L, 1);
    lua_settop(L, 1);
    lua_getglobal(L, "package"); /* 2 */
    if (!lua_istable(L, 2)) return 0;
    lua_getfield(L, 2, "path");       /* 3 */
    lua_getfield(L, 2, "searchpath"); /* 4 */
    lua_getfield(L, 2, "loaded");     /* 5 */
    const char *path = lua_tostring(L, 3);
    if (!path || !lua_isfunction(L, 4) || !lua_istable(L, 5)) return 0;
    const char *third = path;
    for (int i = 0; i < 2 && third; i++) {
        third = strchr(third, ';');
        if (third) third++;
    }
    lua_pushlstring(L, path, third ? (size_t)(third - path - 1) : strlen(path)); /* 6 */
    lua_pushnil(L);
    while (lua_next(L, 5)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) continue;
        lua_pushvalue(L, 4);
        lua_pushvalue(L, -2);
        lua_pushvalue(L, 6);
        lua_call(L, 2, 1);
        if (lua_isstring(L, -1) && wr_vm_add_file(vm, lua_tostring(L, -1)))
            return luaL_error(L, "not enough memory");
        lua_pop(L, 1);
    }
    return 0;
}

/* Runs f protected on the main thread with the vm and, when with_result,
 * the value on top of the main thread as arguments, under the hook.
 * Returns 0, or -1 with the error in err. */
static int look(wr_load *ld, lua_CFunction f, bool with_result, char *err, size_t errlen) {
    lua_State *L = ld->vm->L;
    if (!lua_checkstack(L, 3)) {
        snprintf(err, errlen, "%s: not enough memory", ld->script);
        return -1;
    }
    lua_pushcfunction(L, f);
    lua_pushlightuserdata(L, ld->vm);
    if (with_result) lua_rotate(L, -3, 2); /* f, vm, result */
    budget(ld);
    running = ld;
    int status = lua_pcall(L, with_result ? 2 : 1, 0, 0);
    running = NULL;
    if (status == LUA_OK) return 0;
    take_error(ld, L, err, errlen);
    return -1;
}

/* The chunk ended with nres results on co: finds handle and the modules. */
static wr_load_status conclude(wr_load *ld, int nres, char *err, size_t errlen) {
    lua_State *L = ld->vm->L, *co = ld->co;
    if (!lua_checkstack(L, 4)) {
        snprintf(err, errlen, "%s: not enough memory", ld->script);
        return WR_LOAD_FAILED;
    }
    if (nres > 0) { /* the chunk's first result counts */
        lua_pop(co, nres - 1);
        lua_xmove(co, L, 1);
    } else {
        lua_pushnil(L);
    }
    if (look(ld, find_handle, true, err, errlen) != 0) return WR_LOAD_FAILED;
    if (unhandled) {
        snprintf(err, errlen,
                 "%s: no handler for queue '%.255s' (handle is a table of handlers: give it "
                 "handle[\"%.255s\"] = function(body, msg) ... end)",
                 ld->script, unhandled, unhandled);
        return WR_LOAD_FAILED;
    }
    if (ld->vm->handle_ref == LUA_NOREF) {
        snprintf(err, errlen,
                 "%s: no handle(body, msg) function, nor a table of them by queue name "
                 "(define a global handle or return a table with one)",
                 ld->script);
        return WR_LOAD_FAILED;
    }
    if (look(ld, collect_modules, false, err, errlen) != 0) return WR_LOAD_FAILED;
    lua_settop(L, 0);
    /* From now on the state's new threads are jobs, with the jobs' hook. */
    wr_job_install_hook(L);
    ld->ready = true;
    return WR_LOAD_READY;
}

wr_load_status wr_load_step(wr_load *ld, char *err, size_t errlen) {
    lua_State *co = ld->co;
    wr_vm *vm = ld->vm;
    if (ld->abort) {
        snprintf(err, errlen, "%s", ld->why);
        return WR_LOAD_FAILED;
    }
    int nres;
    ld->resumed_at = wr_clock();
    running = ld;
    wr_vm_limit_memory(vm, true);
    int status = lua_resume(co, NULL, 0, &nres);
    wr_vm_limit_memory(vm, false);
    running = NULL;
    if (status == LUA_YIELD) {
        lua_pop(co, nres); /* a coroutine.yield() at the top level only ends the slice */
        if (!ld->abort) return WR_LOAD_RUNNING;
        snprintf(err, errlen, "%s", ld->why); /* abandoned where it stands */
        return WR_LOAD_FAILED;
    }
    if (status == LUA_OK && !ld->abort) return conclude(ld, nres, err, errlen);
    if (status == LUA_ERRMEM && vm->mem.limit && !ld->abort)
        snprintf(err, errlen, "%s: not enough memory to load it under the memory limit of %zu MB",
                 ld->script, vm->mem.limit >> 20);
    else
        take_error(ld, co, err, errlen);
    return WR_LOAD_FAILED;
}

wr_vm *wr_load_end(wr_load *ld) {
    wr_vm *vm = ld->vm;
    if (!ld->ready) {
        wr_vm_unref(vm);
        vm = NULL;
    } else {
        luaL_unref(vm->L, LUA_REGISTRYINDEX, ld->co_ref);
    }
    free(ld->script);
    free(ld);
    return vm;
}

wr_vm *wr_load_script(const char *script, unsigned version, const wr_ctx *ctx, char *err,
                      size_t errlen) {
    wr_load *ld = wr_load_begin(script, version, ctx, err, errlen);
    if (!ld) return NULL;
    while (wr_load_step(ld, err, errlen) == WR_LOAD_RUNNING) {
    }
    return wr_load_end(ld);
}
