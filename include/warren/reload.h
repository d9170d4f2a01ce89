/* The worker's current version of the script, and the next ones: on
 * request (SIGHUP) or when a file of the current version changes (ev_stat,
 * one reload per burst of saves), the script is loaded as the next version
 * from the loop, a slice of its main chunk per loop turn (load.h), so jobs,
 * heartbeats and signals go on while it runs. A version that fails to load
 * is logged and the current one serves on.
 *
 * Owns on the loop: one ev_stat per watched file, a settle timer, and while
 * a version loads an ev_check (the next slice) with an ev_idle (no blocking
 * poll meanwhile). wr_reloader_free stops them all and drops a load in
 * progress. */
#ifndef WARREN_RELOAD_H
#define WARREN_RELOAD_H

#include <ev.h>

#include "warren/config.h"
#include "warren/context.h"
#include "warren/vm.h"

typedef struct wr_reloader wr_reloader;

typedef enum {
    WR_RELOAD_BEGINS, /* a version starts loading */
    WR_RELOAD_DONE,   /* it serves new messages */
    WR_RELOAD_FAILED, /* it did not load; the current version serves on */
} wr_reload_event;

/* Told of each reload as it begins and ends (after the log line). */
typedef void (*wr_reload_fn)(void *ud, wr_reload_event ev);

/* Serves first (taking its reference) and watches its files when
 * cfg->watch. Returns NULL when out of memory. */
wr_reloader *wr_reloader_new(struct ev_loop *loop, const wr_config *cfg, const wr_ctx *ctx,
                             wr_vm *first, wr_reload_fn fn, void *ud);

/* The version new messages go to. */
wr_vm *wr_reloader_current(const wr_reloader *r);

/* Loads the script as a new version; during a load, once that one ends. */
void wr_reloader_request(wr_reloader *r, const char *why);

/* Stops watching and loading; drops the current version. */
void wr_reloader_free(wr_reloader *r);

#endif
