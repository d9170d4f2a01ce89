/* `warren check` and `warren try`: the script without a broker. */
#ifndef WARREN_TRY_H
#define WARREN_TRY_H

#include "warren/config.h"

/* Loads the script in a fresh state. Prints "SCRIPT: ok" and returns 0, or
 * prints the error with file and line and returns WR_EXIT_CONFIG. */
int wr_check(const wr_config *cfg);

/* Runs handle on each body of cfg (or each line of stdin when there are
 * none), one after another with the real sleep and logging, and prints one
 * outcome line per body on stdout. SIGINT or SIGTERM interrupts the running
 * job and stops. Returns 0 when every body was acked, 1 when any was not,
 * WR_EXIT_TEMPFAIL when a signal interrupted a job, WR_EXIT_CONFIG when the
 * script does not load. */
int wr_try(const wr_config *cfg);

#endif
