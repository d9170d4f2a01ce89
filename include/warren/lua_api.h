/* The `warren` module that scripts require, and the msg table they get. */
#ifndef WARREN_LUA_API_H
#define WARREN_LUA_API_H

#include <lauxlib.h>
#include <lua.h>

#include "warren/delivery.h"
#include "warren/vm.h"

/* Registers the warren module of vm in package.loaded of vm->L. */
void wr_lua_open(wr_vm *vm);

/* How deep headers may nest (tables and arrays within each other) for a
 * message to reach a job. */
#define WR_HEADER_DEPTH 100

/* Pushes the msg table of a delivery: routing key, exchange, flags and the
 * AMQP properties with headers converted to Lua values. Raises an error
 * when the headers nest deeper than WR_HEADER_DEPTH or memory runs out:
 * call it in protected mode. */
void wr_push_msg(lua_State *L, const wr_delivery *d);

struct wr_job;

/* The job whose coroutine L is; raises a Lua error naming warren.fn when L
 * is not a job's own coroutine (load time, a nested coroutine). */
struct wr_job *wr_lua_need_job(lua_State *L, const char *fn);

/* The wait protocol, checked before a wait arms anything: the job whose own
 * coroutine L is, which can yield and is not closing; else raises a Lua
 * error naming warren.fn, and nothing was started. */
struct wr_job *wr_lua_need_wait(lua_State *L, const char *fn);

/* warren.publish, warren.reply and warren.retry (lua_publish.c). */
extern const luaL_Reg wr_lua_publish_funcs[];

#endif
