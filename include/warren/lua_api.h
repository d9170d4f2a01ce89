/* The `warren` module that scripts require. */
#ifndef WARREN_LUA_API_H
#define WARREN_LUA_API_H

#include <lauxlib.h>
#include <lua.h>

#include "warren/vm.h"

/* Registers the warren module of vm in package.loaded of vm->L. */
void wr_lua_open(wr_vm *vm);

/* warren.publish, warren.reply and warren.retry (lua_publish.c). */
extern const luaL_Reg wr_lua_publish_funcs[];

#endif
