/* Loading a version of the script. The state is prepared (standard
 * libraries with os.exit refused, the warren module, the script's directory
 * first on package.path) and the script compiled in protected calls; its
 * main chunk then runs in a coroutine of its own, a slice at a time, as a
 * job does, so the loop serves heartbeats, signals and jobs while it runs.
 *
 * A main chunk still running WR_LOAD_TIMEOUT seconds after the load began
 * fails: at its next slice it is abandoned where it stands (never resumed
 * again), and where it cannot yield (behind a C function) the count hook
 * raises an error at every instruction until it can, so no pcall of the
 * script can keep it alive. The same happens when the context's urgent
 * work asks for Lua to end (the forced stage).
 *
 * The load owns its vm until wr_load_end; nothing of it is on the loop. */
#ifndef WARREN_LOAD_H
#define WARREN_LOAD_H

#include <stddef.h>

#include "warren/context.h"
#include "warren/vm.h"

#define WR_LOAD_TIMEOUT 5
/* Room for a load error: a module that is not found lists every path
 * searched, which takes a kilobyte or two. */
#define WR_LOAD_ERROR_MAX 4096

typedef struct wr_load wr_load;

typedef enum {
    WR_LOAD_READY,   /* the chunk ended and defines handle */
    WR_LOAD_RUNNING, /* the chunk used up its slice: step again */
    WR_LOAD_FAILED,  /* err says why */
} wr_load_status;

/* Creates the state of script as the given version and compiles it; the
 * time limit starts now. Returns NULL with a one-line "file:line: message"
 * in err when it cannot even be compiled. */
wr_load *wr_load_begin(const char *script, unsigned version, const wr_ctx *ctx, char *err,
                       size_t errlen);

/* Runs the main chunk for one slice (WR_SLICE_SECONDS of computation). On
 * WR_LOAD_READY the version knows its handle and the modules it required
 * from its own directory. After WR_LOAD_FAILED or WR_LOAD_READY, only
 * wr_load_end may be called. */
wr_load_status wr_load_step(wr_load *ld, char *err, size_t errlen);

/* Frees the load: returns the version (with one reference) when its last
 * step was WR_LOAD_READY, else NULL, dropping the half-loaded state. */
wr_vm *wr_load_end(wr_load *ld);

/* wr_load_begin, then steps until the chunk ends: `warren check`, `warren
 * try` and the worker's first version, before the loop runs. */
wr_vm *wr_load_script(const char *script, unsigned version, const wr_ctx *ctx, char *err,
                      size_t errlen);

#endif
