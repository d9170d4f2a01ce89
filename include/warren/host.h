/* The worker: owns the event loop and the lifecycle
 * CONNECTING -> RUNNING -> DRAINING -> (FORCED) -> STOPPED. */
#ifndef WARREN_HOST_H
#define WARREN_HOST_H

#include "warren/config.h"

/* Loads cfg->script, connects and consumes until a signal stops the worker.
 * Returns the process exit code (WR_EXIT_*); every failure is logged once. */
int wr_host_run(const wr_config *cfg);

#endif
