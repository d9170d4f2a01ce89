/* Reaching a broker's socket without blocking the loop: the host name is
 * resolved on a short-lived thread of its own (getaddrinfo has no timeout
 * and no non-blocking form), each address is tried with a non-blocking
 * connect, and for amqps the TLS handshake runs on the loop too.
 *
 * Owner and cancellation: the caller owns the wr_dial it started and ends
 * it exactly once, by wr_dial_cancel or by receiving the done callback (the
 * dial is then finished and freed). A resolver thread that is still running
 * when the dial is cancelled finishes on its own and frees what it holds;
 * it never touches the loop after the cancel. */
#ifndef WARREN_DIAL_H
#define WARREN_DIAL_H

#include <ev.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct wr_dial wr_dial;

/* fd >= 0 and (for TLS) ssl on success, both the receiver's to close; or
 * fd -1 with a one-line reason. Called from a loop callback, never from
 * inside wr_dial_start. */
typedef void (*wr_dial_fn)(void *ud, int fd, SSL *ssl, const char *err);

/* Starts reaching host:port; with tls, verifies the server's certificate
 * against the system's trusted CAs and host. Returns NULL when out of
 * memory (done is then never called). */
wr_dial *wr_dial_start(struct ev_loop *loop, const char *host, int port, bool tls, wr_dial_fn done,
                       void *ud);

/* Stops a dial that has not called back yet, and frees it. */
void wr_dial_cancel(wr_dial *d);

#endif
