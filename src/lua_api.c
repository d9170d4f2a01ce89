#include "warren/lua_api.h"

#include <lauxlib.h>
#include <math.h>
#include <string.h>
#include <time.h>

#include "warren/config.h"
#include "warren/context.h"
#include "warren/job.h"
#include "warren/log.h"
#include "warren/http.h"
#include "warren/spawn.h"

static wr_vm *upvm(lua_State *L) {
    return lua_touserdata(L, lua_upvalueindex(1));
}

static int l_sleep(lua_State *L) {
    lua_Number s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s >= 0 && isfinite(s), 1, "expected a non-negative number of seconds");
    wr_job *j = wr_job_need_wait(L, "sleep");
    return wr_job_sleep(L, j, (double)s);
}

void wr_lua_check_options(lua_State *L, int idx, const char *fn, const char *const *names) {
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int k = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            while (names[k] && strcmp(lua_tostring(L, -1), names[k]) != 0)
                k++;
        if (lua_type(L, -1) == LUA_TSTRING && names[k]) continue;
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (k = 0; names[k]; k++) {
            if (k) luaL_addstring(&b, ", ");
            luaL_addstring(&b, names[k]);
        }
        luaL_pushresult(&b);
        const char *known = lua_tostring(L, -1);
        luaL_error(L, "warren.%s: unknown option '%s' (known: %s)", fn, luaL_tolstring(L, -2, NULL),
                   known);
    }
}

/* Wall-clock seconds since the Unix epoch, with their fraction. */
static int l_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
    return 1;
}

/* Seconds on a clock that never jumps; in a job under virtual time, with
 * the skipped sleeps added, as --job-timeout counts. */
static int l_monotonic(lua_State *L) {
    wr_job *j = wr_job_current(L);
    lua_pushnumber(L, (lua_Number)(j ? wr_job_clock(j) : wr_clock()));
    return 1;
}

static int l_draining(lua_State *L) {
    const wr_ctx *ctx = upvm(L)->ctx;
    lua_pushboolean(L, ctx && ctx->draining);
    return 1;
}

static int decide(lua_State *L, const char *fn, wr_outcome o) {
    wr_job_decide(wr_job_need(L, fn), o);
    return 0;
}
static int l_ack(lua_State *L) {
    return decide(L, "ack", WR_OUT_ACK);
}
static int l_requeue(lua_State *L) {
    return decide(L, "requeue", WR_OUT_REQUEUE);
}
static int l_reject(lua_State *L) {
    return decide(L, "reject", WR_OUT_REJECT);
}

/* log.<level>(...): the arguments through tostring, separated by spaces. */
static int log_at(lua_State *L, wr_log_level level) {
    if (!wr_log_enabled(level)) return 0;
    int n = lua_gettop(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        if (i > 1) luaL_addchar(&b, ' ');
        luaL_tolstring(L, i, NULL);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    wr_job *j = wr_job_current(L);
    if (!j) {
        wr_log(level, "%s", lua_tostring(L, -1));
        return 0;
    }
    const wr_vm *vm = upvm(L);
    wr_log_job f = wr_delivery_log_fields(wr_job_delivery(j), vm->version);
    f.script = 1;
    wr_log_for(level, &f, "%s", lua_tostring(L, -1));
    return 0;
}
static int l_debug(lua_State *L) {
    return log_at(L, WR_LOG_DEBUG);
}
static int l_info(lua_State *L) {
    return log_at(L, WR_LOG_INFO);
}
static int l_warn(lua_State *L) {
    return log_at(L, WR_LOG_WARN);
}
static int l_error(lua_State *L) {
    return log_at(L, WR_LOG_ERROR);
}

static int open_warren(lua_State *L) {
    static const luaL_Reg funcs[] = {{"sleep", l_sleep},
                                     {"draining", l_draining},
                                     {"ack", l_ack},
                                     {"requeue", l_requeue},
                                     {"reject", l_reject},
                                     {"spawn", wr_spawn_lua},
                                     {"http", wr_http_lua},
                                     {"now", l_now},
                                     {"monotonic", l_monotonic},
                                     {NULL, NULL}};
    static const luaL_Reg logf[] = {
        {"debug", l_debug}, {"info", l_info}, {"warn", l_warn}, {"error", l_error}, {NULL, NULL}};
    wr_vm *vm = lua_touserdata(L, lua_upvalueindex(1));
    lua_newtable(L);
    lua_pushlightuserdata(L, vm);
    luaL_setfuncs(L, funcs, 1);
    lua_pushlightuserdata(L, vm);
    luaL_setfuncs(L, wr_lua_publish_funcs, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, vm);
    luaL_setfuncs(L, logf, 1);
    lua_setfield(L, -2, "log");
    lua_pushinteger(L, (lua_Integer)vm->version);
    lua_setfield(L, -2, "version");
    return 1;
}

/* os.exit would end the worker on the spot: no drain, no settle, children
 * left running. */
static int l_no_exit(lua_State *L) {
    return luaL_error(L, "os.exit is not available to warren scripts: return from handle, or "
                         "raise an error, to end a job");
}

/* coroutine.resume and coroutine.close (the original is upvalue 1), for
 * any coroutine but a job's own: the host resumes a job where it waits, and
 * one resumed from another job would run on past its wait, or end unseen.
 * (A job's coroutine is reused by a later job once it returned.) */
static int l_guarded(lua_State *L) {
    lua_State *co = lua_tothread(L, 1);
    if (co && wr_job_current(co) && co != L)
        return luaL_error(L, "a job's own coroutine is resumed and closed by warren only");
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

void wr_lua_open(wr_vm *vm) {
    lua_State *L = vm->L;
    if (lua_getglobal(L, "os") == LUA_TTABLE) {
        lua_pushcfunction(L, l_no_exit);
        lua_setfield(L, -2, "exit");
    }
    lua_pop(L, 1);
    if (lua_getglobal(L, "coroutine") == LUA_TTABLE) {
        static const char *const guarded[] = {"resume", "close"};
        for (int i = 0; i < 2; i++) {
            lua_getfield(L, -1, guarded[i]);
            lua_pushcclosure(L, l_guarded, 1);
            lua_setfield(L, -2, guarded[i]);
        }
    }
    lua_pop(L, 1);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushlightuserdata(L, vm);
    lua_pushcclosure(L, open_warren, 1);
    lua_call(L, 0, 1);
    lua_setfield(L, -2, "warren");
    lua_pop(L, 1);
}
