/* What the scripts of one worker may use beyond their own Lua state: the
 * loop, the configuration, the publisher, whether a drain has begun, and the
 * host's urgent work. The host (or `warren try`, `warren check`) owns it and
 * it outlives every version of the script; each version's warren module
 * reaches it through its vm (vm.h), never through the scheduler. */
#ifndef WARREN_CONTEXT_H
#define WARREN_CONTEXT_H

#include <stdbool.h>

struct ev_loop;
struct wr_config;
struct wr_publisher;
struct wr_stats;

/* The host's urgent work while Lua computes where it cannot yield (a nested
 * coroutine, behind a C function, a main chunk): keep connections alive,
 * look at signals. Called from the count hook, so it must not call into Lua
 * nor resume or end a job. Returns true when the running Lua must end now
 * (the forced stage). */
typedef bool (*wr_urgent_fn)(void *ud);

typedef struct wr_ctx {
    struct ev_loop *loop;        /* NULL in `warren check`, where nothing waits */
    const struct wr_config *cfg; /* NULL in `warren check` */
    struct wr_publisher *pub;    /* NULL where publishing is only logged (`warren try`) */
    bool draining;               /* warren.draining() */
    struct wr_stats *stats;      /* counts publishes and spawns; NULL: not counted */
    wr_urgent_fn urgent;         /* NULL: nothing is urgent */
    void *urgent_ud;
} wr_ctx;

#endif
