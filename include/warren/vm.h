/* One Lua state per loaded version of the user's script, reference counted:
 * the host holds the current version, and each job pins the version it
 * started on, so a reload never pulls a state from under a running job. */
#ifndef WARREN_VM_H
#define WARREN_VM_H

#include <lua.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>
#include <time.h>

#include "warren/context.h"

/* A file the version was loaded from, and how it looked then. */
typedef struct wr_vm_file {
    char *path;
    bool found; /* the stat below succeeded */
    struct stat st;
} wr_vm_file;

/* The bytes a version's state holds, counted by its allocator, which
 * refuses to go past limit while `enforced`. */
typedef struct wr_vm_memory {
    lua_Alloc base; /* Lua's own allocator, which does the work */
    void *base_ud;
    size_t used;
    size_t limit; /* 0: none */
    bool enforced;
} wr_vm_memory;

/* A finished job's coroutine kept for another job: dead after a normal
 * return, so it starts afresh, and held by its registry reference. */
typedef struct wr_vm_thread {
    lua_State *co;
    int ref;
} wr_vm_thread;

typedef struct wr_vm {
    lua_State *L;
    wr_vm_memory mem;
    int refs;
    unsigned version;
    int handle_ref;       /* registry reference of the script's handle function, or of */
    bool handle_by_queue; /* a table of the loader's: handler functions by queue name */
    const wr_ctx *ctx;    /* what its warren module may use; never NULL */
    wr_vm_file *files;    /* the script and the modules it required from its own directory */
    size_t nfiles;
    wr_vm_thread *idle; /* coroutines to reuse (wr_vm_keep_thread), the last first */
    size_t nidle, idle_cap;
} wr_vm;

/* A fresh Lua state as the given version, with no library opened yet and
 * its memory counted (load.h makes it a version of the script). Returns the
 * vm with one reference, or NULL when out of memory. */
wr_vm *wr_vm_new(unsigned version, const wr_ctx *ctx);

/* Adds path to the files of vm, as it is now, once. Returns 0, or -1 when
 * out of memory. */
int wr_vm_add_file(wr_vm *vm, const char *path);

/* Sets the most memory, in MiB, the Lua state of each version loaded from
 * now on may hold (--memory-limit); 0 = no limit. */
void wr_vm_set_memory_limit(int megabytes);

/* Turns the memory limit of vm on or off; returns the previous setting. It
 * is on only while scripts run (the main chunk, a job's coroutine), where a
 * refused allocation raises "not enough memory" in protected code: the
 * script's error. While the host itself builds values in the state (a job's
 * coroutine, its msg table, results handed to a job), nothing is refused,
 * so the host never meets a memory error it could not catch. */
bool wr_vm_limit_memory(wr_vm *vm, bool on);

/* Keeps co, a job's coroutine that returned normally (referenced by ref),
 * for the next job of vm, its stack emptied. Returns 0, or -1 when vm keeps
 * enough already (the caller then drops ref). */
int wr_vm_keep_thread(wr_vm *vm, lua_State *co, int ref);

/* Adds a reference. */
void wr_vm_ref(wr_vm *vm);

/* Drops a reference; the state is closed when the last one goes. */
void wr_vm_unref(wr_vm *vm);

/* How many versions are alive right now (loaded and not yet closed). */
int wr_vm_alive(void);

/* The first file of vm that has changed, been replaced or gone since vm
 * read it, to the resolution of the file system's timestamps (unlike
 * ev_stat, which compares whole seconds); NULL when none has. The script is
 * looked at just before it is read; a module just after the script has
 * loaded. */
const char *wr_vm_changed(const wr_vm *vm);

/* Whether a file of vm, as it is now, was last modified (content or inode)
 * in or after the wall-clock second `second`. */
bool wr_vm_touched_since(const wr_vm *vm, time_t second);

#endif
