#include "warren/vm.h"

#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "warren/log.h"

static int alive;
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

static bool same_time(struct timespec a, struct timespec b) {
    return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}

const char *wr_vm_changed(const wr_vm *vm) {
    for (size_t i = 0; i < vm->nfiles; i++) {
        const wr_vm_file *f = &vm->files[i];
        struct stat st;
        bool found = stat(f->path, &st) == 0;
        if (found != f->found) return f->path;
        if (found && (st.st_dev != f->st.st_dev || st.st_ino != f->st.st_ino ||
                      st.st_size != f->st.st_size || !same_time(st.st_mtim, f->st.st_mtim) ||
                      !same_time(st.st_ctim, f->st.st_ctim)))
            return f->path;
    }
    return NULL;
}

bool wr_vm_touched_since(const wr_vm *vm, time_t second) {
    for (size_t i = 0; i < vm->nfiles; i++) {
        struct stat st;
        if (stat(vm->files[i].path, &st) == 0 && (st.st_mtime >= second || st.st_ctime >= second))
            return true;
    }
    return false;
}

/* Once: the watcher of a file listed twice would share its inotify watch
 * with the other one. */
int wr_vm_add_file(wr_vm *vm, const char *path) {
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

wr_vm *wr_vm_new(unsigned version, const wr_ctx *ctx) {
    wr_vm *vm = calloc(1, sizeof *vm);
    if (!vm || !(vm->L = luaL_newstate())) {
        free(vm);
        return NULL;
    }
    alive++;
    /* Lua leaves the main thread's extra space uninitialised, and every thread
     * starts with a copy of it: job.c reads it as the running job, which must
     * be none outside a job's own coroutine (main chunk, nested coroutines). */
    memset(lua_getextraspace(vm->L), 0, LUA_EXTRASPACE);
    vm->refs = 1;
    vm->version = version;
    vm->ctx = ctx;
    vm->handle_ref = LUA_NOREF;
    count_memory(vm);
    return vm;
}

/* Coroutines kept at most per version: enough for a busy prefetch, not the
 * peak of a burst of sleeping jobs. */
#define IDLE_THREADS 256

int wr_vm_keep_thread(wr_vm *vm, lua_State *co, int ref) {
    if (vm->nidle == vm->idle_cap) {
        if (vm->idle_cap == IDLE_THREADS) return -1;
        size_t cap = vm->idle_cap ? vm->idle_cap * 2 : 16;
        wr_vm_thread *grown = realloc(vm->idle, cap * sizeof *grown);
        if (!grown) return -1;
        vm->idle = grown;
        vm->idle_cap = cap;
    }
    lua_settop(co, 0);
    vm->idle[vm->nidle++] = (wr_vm_thread){co, ref};
    return 0;
}

void wr_vm_ref(wr_vm *vm) {
    vm->refs++;
}

void wr_vm_unref(wr_vm *vm) {
    if (--vm->refs > 0) return;
    lua_close(vm->L);
    alive--;
    if (vm->handle_ref != LUA_NOREF) /* a load that failed was never a version */
        wr_debug("closed script version %u; %d version%s alive", vm->version, alive,
                 wr_plural((unsigned)alive));
    for (size_t i = 0; i < vm->nfiles; i++)
        free(vm->files[i].path);
    free(vm->files);
    free(vm->idle);
    free(vm);
}
