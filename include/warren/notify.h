/* The service manager's notify protocol (sd_notify(3)), spoken without
 * libsystemd: one datagram per state change to the AF_UNIX socket named by
 * NOTIFY_SOCKET (a path, or "@name" in the abstract namespace). Nothing is
 * sent when the variable is unset. The variables are removed from the
 * environment, so spawned programs cannot speak for warren.
 *
 * Owns on the loop, when WATCHDOG_USEC is set for this process (and
 * WATCHDOG_PID, if set, names it): a repeating timer that sends WATCHDOG=1
 * at half the interval, so a loop that stops turning is restarted.
 * wr_notify_free stops it and closes the socket. */
#ifndef WARREN_NOTIFY_H
#define WARREN_NOTIFY_H

#include <ev.h>
#include <stdbool.h>

typedef struct wr_notify wr_notify;

/* Reads (and removes) NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.
 * Returns NULL when out of memory. */
wr_notify *wr_notify_new(struct ev_loop *loop);

/* Whether a service manager listens. */
bool wr_notify_enabled(const wr_notify *n);

/* Sends the assignments ("READY=1\nSTATUS=...") as one datagram; a failure
 * to send is logged once at debug level and otherwise ignored. */
void wr_notify_send(wr_notify *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Sends WATCHDOG=1 when half the interval has passed since the last one;
 * for the count hook, while Lua computes where the loop cannot run. */
void wr_notify_keepalive(wr_notify *n);

/* Microseconds on CLOCK_MONOTONIC, for MONOTONIC_USEC. */
unsigned long long wr_notify_monotonic_usec(void);

void wr_notify_free(wr_notify *n);

#endif
