#include "warren/dial.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "warren/log.h"

/* A name lookup shared by the dial and its thread; whoever finishes last
 * frees it (see the header). */
typedef struct lookup {
    pthread_mutex_t mu;
    bool abandoned; /* the dial is gone: the thread frees everything */
    bool finished;  /* the thread is done with everything but the mutex */
    char *host;
    char port[8];
    struct addrinfo *res;
    int rc;
    struct ev_loop *loop;
    ev_async *wake;
} lookup;

struct wr_dial {
    struct ev_loop *loop;
    wr_dial_fn done;
    void *ud;
    bool tls;
    char *host;
    lookup *lk;
    ev_async wake;
    struct addrinfo *addrs, *next; /* the addresses, the next to try */
    struct addrinfo *cur;          /* the one being tried */
    int fd;
    SSL *ssl;
    ev_io io;
    char err[256];
};

static void free_lookup(lookup *lk) {
    if (lk->res) freeaddrinfo(lk->res);
    pthread_mutex_destroy(&lk->mu);
    free(lk->host);
    free(lk);
}

static void *resolve(void *arg) {
    lookup *lk = arg;
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(lk->host, lk->port, &hints, &res);
    pthread_mutex_lock(&lk->mu);
    lk->rc = rc;
    lk->res = res;
    bool abandoned = lk->abandoned;
    if (!abandoned) {
        lk->finished = true;
        ev_async_send(lk->loop, lk->wake);
    }
    pthread_mutex_unlock(&lk->mu);
    if (abandoned) free_lookup(lk);
    return NULL;
}

static void finish(wr_dial *d, int fd, SSL *ssl, wr_dial_failure failure, const char *err) {
    wr_dial_fn done = d->done;
    void *ud = d->ud;
    char why[300] = "";
    if (err) snprintf(why, sizeof why, "%s", err); /* it may live in d */
    if (fd >= 0) {
        d->fd = -1; /* handed over */
        d->ssl = NULL;
    }
    wr_dial_cancel(d);
    done(ud, fd, ssl, failure, err ? why : NULL);
}

static void fail(wr_dial *d, const char *fmt, const char *what) {
    char err[300];
    snprintf(err, sizeof err, fmt, what);
    finish(d, -1, NULL, WR_DIAL_UNREACHABLE, err);
}

/* The TLS context of every dial: one per process, made by
 * wr_dial_tls_setup or on first use. */
static SSL_CTX *tls_ctx;
static bool client_cert;

static SSL_CTX *new_context(void) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    return ctx;
}

/* The last OpenSSL error, as a few words. */
static const char *ssl_reason(void) {
    unsigned long e = ERR_peek_error(); /* the first: the cause */
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    return r ? r : "not a PEM file of the right kind";
}

int wr_dial_tls_setup(const char *ca_file, const char *cert_file, const char *key_file, char *err,
                      size_t errlen) {
    SSL_CTX *ctx = new_context();
    if (!ctx) {
        snprintf(err, errlen, "TLS: cannot set up OpenSSL");
        return -1;
    }
    const char *const files[][2] = {
        {"--tls-ca", ca_file}, {"--tls-cert", cert_file}, {"--tls-key", key_file}};
    for (size_t i = 0; i < 3; i++) {
        FILE *f = files[i][1] ? fopen(files[i][1], "r") : NULL;
        if (files[i][1] && !f) {
            snprintf(err, errlen, "%s: cannot read %s: %s", files[i][0], files[i][1],
                     strerror(errno));
            SSL_CTX_free(ctx);
            return -1;
        }
        if (f) fclose(f);
    }
    ERR_clear_error();
    const char *bad = NULL, *file = NULL;
    if (ca_file ? !SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
                : !SSL_CTX_set_default_verify_paths(ctx))
        bad = "--tls-ca", file = ca_file ? ca_file : "the system's CAs";
    else if (cert_file && !SSL_CTX_use_certificate_chain_file(ctx, cert_file))
        bad = "--tls-cert", file = cert_file;
    else if (key_file && !SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM))
        bad = "--tls-key", file = key_file;
    else if (cert_file && !SSL_CTX_check_private_key(ctx))
        bad = "--tls-key", file = key_file;
    if (bad) {
        snprintf(err, errlen, "%s: cannot use %s: %s", bad, file, ssl_reason());
        SSL_CTX_free(ctx);
        return -1;
    }
    SSL_CTX_free(tls_ctx);
    tls_ctx = ctx;
    client_cert = cert_file != NULL;
    return 0;
}

bool wr_dial_client_cert(void) {
    return client_cert;
}

static SSL_CTX *tls_context(void) {
    if (tls_ctx) return tls_ctx;
    if ((tls_ctx = new_context())) SSL_CTX_set_default_verify_paths(tls_ctx);
    return tls_ctx;
}

bool wr_dial_refused_alert(unsigned long e) {
    if (ERR_GET_LIB(e) != ERR_LIB_SSL) return false;
    switch (ERR_GET_REASON(e)) {
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
        return true;
    default:
        return false;
    }
}

/* Why the handshake failed, and how to report it. */
static wr_dial_failure tls_error(wr_dial *d, char *why, size_t n) {
    long v = SSL_get_verify_result(d->ssl);
    if (v != X509_V_OK) {
        snprintf(why, n, "TLS: the broker's certificate is not trusted: %s",
                 X509_verify_cert_error_string(v));
        return WR_DIAL_UNTRUSTED;
    }
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    if (e && wr_dial_refused_alert(e)) {
        snprintf(why, n, "TLS: the broker refused the client certificate (%s)", r ? r : "alert");
        return WR_DIAL_REFUSED;
    }
    if (e && ERR_GET_LIB(e) == ERR_LIB_SSL &&
        (ERR_GET_REASON(e) == SSL_R_WRONG_VERSION_NUMBER ||
         ERR_GET_REASON(e) == SSL_R_PACKET_LENGTH_TOO_LONG ||
         ERR_GET_REASON(e) == SSL_R_UNKNOWN_PROTOCOL)) {
        snprintf(why, n, "TLS handshake failed: the port does not speak TLS (%s)", r);
        return WR_DIAL_UNTRUSTED;
    }
    snprintf(why, n, "TLS handshake failed: %s",
             r ? r : "the connection closed during the TLS handshake");
    return WR_DIAL_UNREACHABLE;
}

static void tls_step(wr_dial *d) {
    ERR_clear_error();
    int rc = SSL_connect(d->ssl);
    if (rc == 1) {
        ev_io_stop(d->loop, &d->io);
        finish(d, d->fd, d->ssl, WR_DIAL_UNREACHABLE, NULL);
        return;
    }
    int e = SSL_get_error(d->ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        ev_io_stop(d->loop, &d->io);
        ev_io_set(&d->io, d->fd, e == SSL_ERROR_WANT_READ ? EV_READ : EV_WRITE);
        ev_io_start(d->loop, &d->io);
        return;
    }
    char why[300];
    wr_dial_failure f = tls_error(d, why, sizeof why);
    finish(d, -1, NULL, f, why);
}

static void tls_io_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)loop, (void)revents;
    tls_step(w->data);
}

static void start_tls(wr_dial *d) {
    SSL_CTX *ctx = tls_context();
    if (!ctx || !(d->ssl = SSL_new(ctx))) {
        fail(d, "TLS: %s", "cannot set up OpenSSL");
        return;
    }
    SSL_set_fd(d->ssl, d->fd);
    SSL_set_mode(d->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_set_tlsext_host_name(d->ssl, d->host);
    SSL_set1_host(d->ssl, d->host);
    ev_io_init(&d->io, tls_io_cb, d->fd, EV_WRITE);
    d->io.data = d;
    tls_step(d);
}

static void connected(wr_dial *d) {
    int one = 1;
    setsockopt(d->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (d->tls)
        start_tls(d);
    else
        finish(d, d->fd, NULL, WR_DIAL_UNREACHABLE, NULL);
}

static void try_next(wr_dial *d);

/* The address being tried could not be reached: remembered as the error,
 * and said when another address is left to try. */
static void address_failed(wr_dial *d, int err) {
    snprintf(d->err, sizeof d->err, "cannot connect: %s", strerror(err));
    char host[64] = "?", port[16] = "";
    getnameinfo(d->cur->ai_addr, d->cur->ai_addrlen, host, sizeof host, port, sizeof port,
                NI_NUMERICHOST | NI_NUMERICSERV);
    if (d->next)
        wr_debug("%s (%s port %s): %s; trying its next address", d->host, host, port,
                 strerror(err));
}

static void connect_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)revents;
    wr_dial *d = w->data;
    ev_io_stop(loop, w);
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(d->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0) {
        connected(d);
        return;
    }
    address_failed(d, soerr ? soerr : errno);
    close(d->fd);
    d->fd = -1;
    try_next(d);
}

/* Connects to the next address, or reports the last error when none is left. */
static void try_next(wr_dial *d) {
    while (d->next) {
        struct addrinfo *ai = d->next;
        d->next = ai->ai_next;
        d->cur = ai;
        int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            address_failed(d, errno);
            continue;
        }
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        d->fd = fd;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            connected(d);
            return;
        }
        if (errno == EINPROGRESS) {
            ev_io_init(&d->io, connect_cb, fd, EV_WRITE);
            d->io.data = d;
            ev_io_start(d->loop, &d->io);
            return;
        }
        address_failed(d, errno);
        close(fd);
        d->fd = -1;
    }
    finish(d, -1, NULL, WR_DIAL_UNREACHABLE, d->err[0] ? d->err : "cannot connect: no address");
}

static void resolved_cb(struct ev_loop *loop, ev_async *w, int revents) {
    (void)revents;
    wr_dial *d = w->data;
    lookup *lk = d->lk;
    pthread_mutex_lock(&lk->mu);
    bool finished = lk->finished;
    pthread_mutex_unlock(&lk->mu);
    if (!finished) return;
    ev_async_stop(loop, w);
    d->lk = NULL;
    int rc = lk->rc;
    d->addrs = d->next = lk->res;
    lk->res = NULL;
    free_lookup(lk);
    if (rc != 0) {
        fail(d, "cannot resolve the host name: %s", gai_strerror(rc));
        return;
    }
    try_next(d);
}

wr_dial *wr_dial_start(struct ev_loop *loop, const char *host, int port, bool tls, wr_dial_fn done,
                       void *ud) {
    wr_dial *d = calloc(1, sizeof *d);
    lookup *lk = calloc(1, sizeof *lk);
    if (!d || !lk || !(d->host = strdup(host)) || !(lk->host = strdup(host))) goto nomem;
    d->loop = loop;
    d->done = done;
    d->ud = ud;
    d->tls = tls;
    d->fd = -1;
    snprintf(lk->port, sizeof lk->port, "%d", port);
    pthread_mutex_init(&lk->mu, NULL);
    lk->loop = loop;
    lk->wake = &d->wake;
    ev_async_init(&d->wake, resolved_cb);
    d->wake.data = d;
    ev_async_start(loop, &d->wake);
    d->lk = lk;
    pthread_attr_t attr;
    pthread_t t;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* The thread takes no signal: they are the loop thread's to handle. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&t, &attr, resolve, lk);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        ev_async_stop(loop, &d->wake);
        d->lk = NULL;
        free_lookup(lk);
        free(d->host);
        free(d);
        return NULL;
    }
    return d;
nomem:
    if (lk) free(lk->host);
    free(lk);
    if (d) free(d->host);
    free(d);
    return NULL;
}

void wr_dial_cancel(wr_dial *d) {
    if (!d) return;
    ev_async_stop(d->loop, &d->wake);
    ev_io_stop(d->loop, &d->io);
    if (d->lk) {
        lookup *lk = d->lk;
        pthread_mutex_lock(&lk->mu);
        bool finished = lk->finished;
        lk->abandoned = true;
        pthread_mutex_unlock(&lk->mu);
        if (finished) free_lookup(lk); /* the thread no longer touches it */
    }
    if (d->ssl) SSL_free(d->ssl);
    if (d->fd >= 0) close(d->fd);
    if (d->addrs) freeaddrinfo(d->addrs);
    free(d->host);
    free(d);
}
