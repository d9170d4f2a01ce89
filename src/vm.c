#include "warren/vm.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/job.h"
#include "warren/log.h"
#include "warren/lua_api.h"

static int alive;

int wr_vm_alive(void) {
    return alive;
}

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

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

static int add_file(wr_vm *vm, const char *path) {
    char **grown = realloc(vm->files, (vm->nfiles + 1) * sizeof *grown);
    if (!grown) return -1;
    vm->files = grown;
    if (!(vm->files[vm->nfiles] = strdup(path))) return -1;
    vm->nfiles++;
    return 0;
}

/* Records the script and every module loaded from the script's directory
 * (the first two entries of package.path), so the host can watch them. */
static void collect_files(wr_vm *vm, const char *script) {
    lua_State *L = vm->L;
    add_file(vm, script);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    const char *path = lua_tostring(L, -1);
    const char *third = path;
    for (int i = 0; i < 2 && third; i++) {
        third = strchr(third, ';');
        if (third) third++;
    }
    lua_pushlstring(L, path, third ? (size_t)(third - path - 1) : strlen(path));
    int own = lua_gettop(L);
    lua_getfield(L, -3, "loaded");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) continue;
        lua_getfield(L, own - 2, "searchpath");
        lua_pushvalue(L, -2);
        lua_pushvalue(L, own);
        lua_call(L, 2, 1);
        if (lua_isstring(L, -1)) add_file(vm, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_settop(L, 0);
}

/* Copies the first line of the error on top of L into err. */
static void take_error(lua_State *L, char *err, size_t errlen) {
    const char *msg = lua_tostring(L, -1);
    if (!msg) msg = "error object is not a string";
    size_t n = strcspn(msg, "\n");
    snprintf(err, errlen, "%.*s", (int)n, msg);
}

wr_vm *wr_vm_load(const char *script, unsigned version, struct wr_sched *sched, char *err,
                  size_t errlen) {
    wr_vm *vm = calloc(1, sizeof *vm);
    if (!vm || !(vm->L = luaL_newstate())) {
        free(vm);
        snprintf(err, errlen, "%s: out of memory", script);
        return NULL;
    }
    alive++;
    vm->refs = 1;
    vm->version = version;
    vm->sched = sched;
    vm->handle_ref = LUA_NOREF;
    lua_State *L = vm->L;
    luaL_openlibs(L);
    set_path(L, script);
    wr_lua_open(vm);

    lua_pushcfunction(L, traceback);
    if (luaL_loadfilex(L, script, "t") != LUA_OK) {
        take_error(L, err, errlen);
        goto fail;
    }
    if (lua_pcall(L, 0, 1, -2) != LUA_OK) {
        take_error(L, err, errlen);
        goto fail;
    }
    /* handle: a field of the returned table, else the global. */
    if (lua_istable(L, -1))
        lua_getfield(L, -1, "handle");
    else
        lua_getglobal(L, "handle");
    if (!lua_isfunction(L, -1)) {
        snprintf(err, errlen,
                 "%s: no handle(body, msg) function (define a global handle or "
                 "return a table with one)",
                 script);
        goto fail;
    }
    vm->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    collect_files(vm, script);
    /* Set after loading: the main chunk cannot yield, and jobs inherit it. */
    wr_job_install_hook(L);
    return vm;
fail:
    lua_close(L);
    free(vm);
    alive--;
    return NULL;
}

void wr_vm_ref(wr_vm *vm) {
    vm->refs++;
}

void wr_vm_unref(wr_vm *vm) {
    if (--vm->refs > 0) return;
    lua_close(vm->L);
    alive--;
    wr_debug("closed script version %u; %d versions alive", vm->version, alive);
    for (size_t i = 0; i < vm->nfiles; i++)
        free(vm->files[i]);
    free(vm->files);
    free(vm);
}
