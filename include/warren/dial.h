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

/* Why a dial failed. */
typedef enum {
    WR_DIAL_UNREACHABLE, /* resolution, connect, a closed or broken handshake: worth retrying */
    WR_DIAL_UNTRUSTED,   /* the server's certificate did not verify, or it does not speak TLS */
    WR_DIAL_REFUSED,     /* the server refused our client certificate (or wanted one) */
} wr_dial_failure;

/* fd >= 0 and (for TLS) ssl on success, both the receiver's to close; or
 * fd -1 with why and a one-line reason. Called from a loop callback, never
 * from inside wr_dial_start. */
typedef void (*wr_dial_fn)(void *ud, int fd, SSL *ssl, wr_dial_failure why, const char *err);

/* Sets up TLS for the dials that follow: the CAs trusted (the PEM file
 * ca_file, or the system's when NULL) and the client certificate chain and
 * key presented (both PEM files, or both NULL). Returns 0, or -1 with a
 * one-line message in err. Without a call, the system's CAs and no client
 * certificate. */
int wr_dial_tls_setup(const char *ca_file, const char *cert_file, const char *key_file, char *err,
                      size_t errlen);

/* Whether dials present a client certificate (wr_dial_tls_setup). */
bool wr_dial_client_cert(void);

/* Whether the OpenSSL error e is the server's alert refusing our
 * certificate (bad, unknown CA, expired, required but missing...): in TLS
 * 1.3 it comes only with the first read after the handshake. */
bool wr_dial_refused_alert(unsigned long e);

/* Starts reaching host:port, each of its addresses in turn; with tls,
 * verifies the server's certificate against the trusted CAs and host.
 * Returns NULL when out of memory (done is then never called). */
wr_dial *wr_dial_start(struct ev_loop *loop, const char *host, int port, bool tls, wr_dial_fn done,
                       void *ud);

/* Stops a dial that has not called back yet, and frees it. */
void wr_dial_cancel(wr_dial *d);

#endif
