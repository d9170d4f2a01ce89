/* The `warren` module that scripts require, and the msg table they get. */
#ifndef WARREN_LUA_API_H
#define WARREN_LUA_API_H

#include <lauxlib.h>
#include <lua.h>

#include "warren/delivery.h"
#include "warren/vm.h"

/* Registers the warren module of vm in package.loaded of vm->L. */
void wr_lua_open(wr_vm *vm);

/* Pushes the msg table of a delivery: routing key, exchange, flags and the
 * AMQP properties with headers converted to Lua values. */
void wr_push_msg(lua_State *L, const wr_delivery *d);

struct wr_job;

/* The job whose coroutine L is; raises a Lua error naming warren.fn when L
 * is not a job's own coroutine (load time, a nested coroutine). */
struct wr_job *wr_lua_need_job(lua_State *L, const char *fn);

/* warren.publish, warren.reply and warren.retry (lua_publish.c). */
extern const luaL_Reg wr_lua_publish_funcs[];

#endif
