#include "warren/vm.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "warren/job.h"
#include "warren/log.h"
#include "warren/lua_api.h"

/* How long the main chunk may run: one that never ends would otherwise hang
 * the host's loop (heartbeats included) on a bad save, or `warren check`. */
#define LOAD_TIMEOUT 5
/* Instructions between two looks at the clock while loading. */
#define LOAD_HOOK_COUNT 10000

static int alive;
static double load_deadline;
static size_t memory_limit;

void wr_vm_set_memory_limit(int megabytes) {
    size_t mb = megabytes > 0 ? (size_t)megabytes : 0;
    memory_limit = mb > SIZE_MAX >> 20 ? SIZE_MAX : mb << 20;
}

bool wr_vm_limit_memory(wr_vm *vm, bool on) {
    bool was = vm->mem.enforced;
    vm->mem.enforced = on;
    return was;
}

/* Lua's allocator with a count of the bytes in use: growing past the limit
 * fails (Lua then collects garbage and tries once more before it raises
 * "not enough memory"); shrinking and freeing never fail, as Lua requires. */
static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    wr_vm_memory *m = ud;
    size_t old = ptr ? osize : 0; /* for a new block, osize is the kind of object */
    if (nsize > old && m->enforced && m->limit && m->used + (nsize - old) > m->limit) return NULL;
    void *p = m->base(m->base_ud, ptr, osize, nsize);
    if (p || nsize == 0) m->used = m->used - old + nsize;
    return p;
}

/* Counts from here on what the state holds, in Lua's own accounting, so the
 * blocks freed later that were allocated before are subtracted exactly. */
static void count_memory(wr_vm *vm) {
    lua_State *L = vm->L;
    vm->mem.base = lua_getallocf(L, &vm->mem.base_ud);
    vm->mem.used = (size_t)lua_gc(L, LUA_GCCOUNT) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB);
    vm->mem.limit = memory_limit;
    lua_setallocf(L, limited_alloc, &vm->mem);
}

int wr_vm_alive(void) {
    return alive;
}

/* Message handler of the load: the error with a traceback, as lua.c does. An
 * error object that is not a string is named by its type, where it was raised. */
static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        luaL_where(L, 2);
        msg = lua_pushfstring(L, "%s(error object is a %s value)", lua_tostring(L, -1),
                              luaL_typename(L, 1));
    }
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

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Count hook while the main chunk runs: ends a load that runs too long with
 * an error at the line it has reached. Coroutines the chunk made keep this
 * hook: once loading is over it serves them as the jobs' hook. */
static void load_hook(lua_State *L, lua_Debug *ar) {
    if (load_deadline == 0) {
        wr_job_hook(L, ar);
        return;
    }
    if (now() <= load_deadline) return;
    /* luaL_error would name the caller of the running function. */
    lua_getinfo(L, "Sl", ar);
    lua_pushfstring(L, "%s:%d: still loading after %d s (an endless loop at the top level?)",
                    ar->short_src, ar->currentline, LOAD_TIMEOUT);
    lua_error(L);
}

static bool same_time(struct timespec a, struct timespec b) {
    return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}

bool wr_vm_changed(const wr_vm *vm) {
    for (size_t i = 0; i < vm->nfiles; i++) {
        const wr_vm_file *f = &vm->files[i];
        struct stat st;
        bool found = stat(f->path, &st) == 0;
        if (found != f->found) return true;
        if (found && (st.st_dev != f->st.st_dev || st.st_ino != f->st.st_ino ||
                      st.st_size != f->st.st_size || !same_time(st.st_mtim, f->st.st_mtim) ||
                      !same_time(st.st_ctim, f->st.st_ctim)))
            return true;
    }
    return false;
}

bool wr_vm_touched_since(const wr_vm *vm, time_t second) {
    for (size_t i = 0; i < vm->nfiles; i++) {
        struct stat st;
        if (stat(vm->files[i].path, &st) == 0 && (st.st_mtime >= second || st.st_ctime >= second))
            return true;
    }
    return false;
}

/* Adds path to the files of vm, as it is now, once: the watcher of a file
 * listed twice would share its inotify watch with the other one. */
static int add_file(wr_vm *vm, const char *path) {
    for (size_t i = 0; i < vm->nfiles; i++)
        if (strcmp(vm->files[i].path, path) == 0) return 0;
    wr_vm_file *grown = realloc(vm->files, (vm->nfiles + 1) * sizeof *grown);
    if (!grown) return -1;
    vm->files = grown;
    wr_vm_file *f = &vm->files[vm->nfiles];
    if (!(f->path = strdup(path))) return -1;
    f->found = stat(path, &f->st) == 0;
    vm->nfiles++;
    return 0;
}

/* Records every module loaded from the script's directory (the first two
 * entries of package.path), so the host can watch them. Runs protected
 * (the script may have replaced package or its fields): vm is argument 1. A
 * script without a usable package table has no modules to watch. */
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
        if (lua_isstring(L, -1) && add_file(vm, lua_tostring(L, -1)))
            return luaL_error(L, "not enough memory");
        lua_pop(L, 1);
    }
    return 0;
}

/* Finds handle in the main chunk's result (argument 2), or else as a global,
 * and references it in vm (argument 1). Runs protected: a returned table or
 * _G may have metamethods of the script's. */
static int find_handle(lua_State *L) {
    wr_vm *vm = lua_touserdata(L, 1);
    if (lua_istable(L, 2))
        lua_getfield(L, 2, "handle");
    else
        lua_getglobal(L, "handle");
    if (!lua_isfunction(L, -1)) return 0;
    vm->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Copies the error message on top of L into err as one line, without the
 * traceback. A module that does not compile gives two lines ("error loading
 * module ..." and "\tfile:line: ..."): both are kept, and so the line. */
static void take_error(lua_State *L, char *err, size_t errlen) {
    const char *msg = lua_tostring(L, -1);
    if (!msg) msg = "an error whose value is not a string";
    const char *end = strstr(msg, "\nstack traceback:");
    size_t len = end ? (size_t)(end - msg) : strlen(msg);
    size_t o = 0;
    for (size_t i = 0; i < len && o + 1 < errlen; i++) {
        if (msg[i] != '\n' && msg[i] != '\t')
            err[o++] = msg[i];
        else if (o > 0 && err[o - 1] != ' ')
            err[o++] = ' ';
    }
    err[o] = '\0';
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
    /* Lua leaves the main thread's extra space uninitialised, and every thread
     * starts with a copy of it: job.c reads it as the running job, which must
     * be none outside a job's own coroutine (main chunk, nested coroutines). */
    memset(lua_getextraspace(vm->L), 0, LUA_EXTRASPACE);
    vm->refs = 1;
    vm->version = version;
    vm->sched = sched;
    vm->handle_ref = LUA_NOREF;
    count_memory(vm);
    lua_State *L = vm->L;
    luaL_openlibs(L);
    set_path(L, script);
    wr_lua_open(vm);

    /* Stamped before it is read: a save made during the load shows as a change. */
    if (add_file(vm, script) != 0) {
        snprintf(err, errlen, "%s: out of memory", script);
        goto fail;
    }
    lua_pushcfunction(L, traceback);
    wr_vm_limit_memory(vm, true);
    int status = luaL_loadfilex(L, script, "t");
    if (status == LUA_OK) {
        load_deadline = now() + LOAD_TIMEOUT;
        lua_sethook(L, load_hook, LUA_MASKCOUNT, LOAD_HOOK_COUNT);
        status = lua_pcall(L, 0, 1, -2);
        load_deadline = 0;
    }
    wr_vm_limit_memory(vm, false);
    if (status == LUA_ERRMEM && vm->mem.limit) {
        snprintf(err, errlen, "%s: not enough memory to load it under the memory limit of %zu MB",
                 script, vm->mem.limit >> 20);
        goto fail;
    }
    if (status != LUA_OK) {
        take_error(L, err, errlen);
        goto fail;
    }
    /* handle: a field of the returned table, else the global. */
    lua_pushcfunction(L, find_handle);
    lua_pushlightuserdata(L, vm);
    lua_rotate(L, -3, 2); /* find_handle, vm, result */
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        take_error(L, err, errlen);
        goto fail;
    }
    if (vm->handle_ref == LUA_NOREF) {
        snprintf(err, errlen,
                 "%s: no handle(body, msg) function (define a global handle or "
                 "return a table with one)",
                 script);
        goto fail;
    }
    lua_pushcfunction(L, collect_modules);
    lua_pushlightuserdata(L, vm);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        take_error(L, err, errlen);
        goto fail;
    }
    lua_settop(L, 0);
    /* Set after loading: the main chunk cannot yield, and jobs inherit it. */
    wr_job_install_hook(L);
    return vm;
fail:
    wr_vm_unref(vm);
    return NULL;
}

void wr_vm_ref(wr_vm *vm) {
    vm->refs++;
}

void wr_vm_unref(wr_vm *vm) {
    if (--vm->refs > 0) return;
    lua_close(vm->L);
    alive--;
    if (vm->handle_ref != LUA_NOREF) /* a load that failed was never a version */
        wr_debug("closed script version %u; %d versions alive", vm->version, alive);
    for (size_t i = 0; i < vm->nfiles; i++)
        free(vm->files[i].path);
    free(vm->files);
    free(vm);
}
