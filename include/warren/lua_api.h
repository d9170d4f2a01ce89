/* The `warren` module that scripts require. */
#ifndef WARREN_LUA_API_H
#define WARREN_LUA_API_H

#include <lauxlib.h>
#include <lua.h>

#include "warren/publisher.h"
#include "warren/vm.h"

/* Registers the warren module of vm in package.loaded of vm->L. */
void wr_lua_open(wr_vm *vm);

/* Raises "warren.FN: unknown option 'K' (known: ...)" unless every key of
 * the table at idx is one of names (NULL-terminated). */
void wr_lua_check_options(lua_State *L, int idx, const char *fn, const char *const *names);

/* warren.publish, warren.reply and warren.retry (lua_publish.c). */
extern const luaL_Reg wr_lua_publish_funcs[];

/* Fills m from the table at index 1 as warren.publish reads it (exchange,
 * routing_key, body, headers, the properties by name, persistent); a
 * message without message_id gets one. Strings stay on the Lua stack, so m
 * is valid until the caller pops them; headers live in pool. Raises an
 * error for a bad field: call it in protected mode. */
void wr_lua_build_message(lua_State *L, struct wr_message *m, amqp_pool_t *pool);

#endif
