/* One Lua state per loaded version of the user's script, reference counted:
 * the host holds the current version, and each job pins the version it
 * started on, so a reload never pulls a state from under a running job. */
#ifndef WARREN_VM_H
#define WARREN_VM_H

#include <lua.h>
#include <stddef.h>

struct wr_sched;

typedef struct wr_vm {
    lua_State *L;
    int refs;
    unsigned version;
    int handle_ref; /* registry reference of the script's handle function */
    struct wr_sched *sched;
    char **files; /* the script and the modules it required from its own directory */
    size_t nfiles;
} wr_vm;

/* Loads script into a fresh Lua state as the given version, with the warren
 * module available and the script's directory on package.path, and checks
 * that it defines handle (as a global, or a field of the table the chunk
 * returns). Returns the vm with one reference, or NULL with a one-line
 * "file:line: message" in err. */
wr_vm *wr_vm_load(const char *script, unsigned version, struct wr_sched *sched, char *err,
                  size_t errlen);

/* Adds a reference. */
void wr_vm_ref(wr_vm *vm);

/* Drops a reference; the state is closed when the last one goes. */
void wr_vm_unref(wr_vm *vm);

/* How many versions are alive right now (loaded and not yet closed). */
int wr_vm_alive(void);

#endif
