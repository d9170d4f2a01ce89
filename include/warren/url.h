/* The password of an AMQP URL (amqp://user:password@host:port/vhost): where
 * it is, a copy of the URL without it for messages, the URL with another
 * one, and wiping it where a process's argv or environment shows it. Pure
 * string work on the URL's text; no I/O. */
#ifndef WARREN_URL_H
#define WARREN_URL_H

#include <stdbool.h>
#include <stddef.h>

/* Whether url gives a password ("user:password@", even an empty one). */
bool wr_url_names_password(const char *url);

/* Copies the n bytes of url into out (NUL-terminated, cut to outlen) with
 * its password, if any, replaced by "***". Errs on the side of hiding: a
 * password is taken to run to the last '@', as one that should have been
 * escaped may hold '/' and '@'. */
void wr_url_redact(const char *url, size_t n, char *out, size_t outlen);

/* Overwrites in place, with '*', the password of each URL of a
 * comma-separated list (as wr_url_redact finds it), so that
 * /proc/PID/cmdline and ps do not show it. */
void wr_url_wipe(char *list);

/* A new URL: url with its password set to password (percent-encoded), the
 * user "guest" when url names none. Returns a malloc'd string, or NULL when
 * out of memory. */
char *wr_url_with_password(const char *url, const char *password);

#endif
