#include "warren/wire.h"

#include <errno.h>
#include <openssl/err.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "warren/dial.h"
#include "warren/url.h"

#define FRAME_MAX 131072
#define INBUF_SIZE (2 * FRAME_MAX)
#define CHUNK_MIN 4096
#define BORROW_MIN 16384          /* body frames this large are not copied when borrowed */
#define WRITE_BUDGET (256 * 1024) /* bytes written per loop turn, at most */
#define FRAME_OVERHEAD 8          /* type, channel, size, frame end */

typedef enum { W_IDLE, W_DIALING, W_HANDSHAKE, W_READY, W_CLOSING, W_DEAD } wire_state;

/* Bytes of the outbox: its own (data), or borrowed from an owner (ext)
 * until written or detached. */
typedef struct chunk {
    struct chunk *next;
    size_t len, off, cap;
    const unsigned char *ext;
    const void *owner;
    unsigned char data[];
} chunk;

static const unsigned char *bytes_of(const chunk *c) {
    return c->ext ? c->ext : c->data;
}

struct wr_wire {
    struct ev_loop *loop;
    wr_wire_events ev;
    void *ud;
    wire_state state;
    char *url; /* amqp_parse_url's copy: info points into it */
    struct amqp_connection_info info;
    bool external; /* log in with the TLS client certificate (SASL EXTERNAL) */
    char where[256];
    int hb_asked, hb;
    int frame_max;
    wr_dial *dial;
    int fd;
    SSL *ssl;
    amqp_connection_state_t dec; /* the decoder only: it never touches the socket */
    ev_io rio, wio;
    ev_timer deadline; /* bounds connecting, and closing */
    double timeout;    /* of connecting */
    ev_timer beat;     /* heartbeats out, and silence in */
    ev_timer report;   /* reports closed from the loop's top level */
    ev_tstamp last_in, last_out;
    chunk *head, *tail; /* the outbox */
    unsigned char *in;  /* read, not yet decoded: in[in_off..in_len) */
    size_t in_off, in_len;
    unsigned char *scratch; /* one encoded frame payload */
    wr_broker_status closed_st;
    char closed_why[600];
};

static void report_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop, (void)revents;
    wr_wire *w = t->data;
    w->state = W_IDLE;
    w->ev.closed(w->ud, w->closed_st, w->closed_why);
}

static void drop_outbox(wr_wire *w) {
    while (w->head) {
        chunk *c = w->head;
        w->head = c->next;
        free(c);
    }
    w->tail = NULL;
}

/* Releases the socket and everything of the connection but the decoder,
 * which may be in the middle of handing out a frame. */
static void shut(wr_wire *w) {
    ev_io_stop(w->loop, &w->rio);
    ev_io_stop(w->loop, &w->wio);
    ev_timer_stop(w->loop, &w->deadline);
    ev_timer_stop(w->loop, &w->beat);
    wr_dial_cancel(w->dial);
    w->dial = NULL;
    if (w->ssl) SSL_free(w->ssl);
    w->ssl = NULL;
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    drop_outbox(w);
    w->in_off = w->in_len = 0;
}

/* Ends the connection and reports it on the next loop turn, so that a
 * failure seen deep inside a callback never unwinds through it. */
static void lose(wr_wire *w, wr_broker_status st, const char *fmt, ...) {
    if (w->state == W_DEAD || w->state == W_IDLE) return;
    w->state = W_DEAD;
    va_list ap;
    va_start(ap, fmt);
    char why[256];
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    snprintf(w->closed_why, sizeof w->closed_why, "%s: %s", w->where, why);
    w->closed_st = st;
    shut(w);
    ev_timer_set(&w->report, 0, 0);
    ev_timer_start(w->loop, &w->report);
}

static bool alive(const wr_wire *w) {
    return w->state == W_HANDSHAKE || w->state == W_READY || w->state == W_CLOSING;
}

/* Reads what the socket has: >0 bytes, 0 at end of file, -2 when nothing
 * is there now, -1 on error. */
static ssize_t rx(wr_wire *w, void *buf, size_t n) {
    if (w->ssl) {
        ERR_clear_error();
        int r = SSL_read(w->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(w->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return -2;
        return e == SSL_ERROR_ZERO_RETURN ? 0 : -1;
    }
    ssize_t r = recv(w->fd, buf, n, 0);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return -2;
    return r;
}

static ssize_t tx(wr_wire *w, const void *buf, size_t n) {
    if (w->ssl) {
        ERR_clear_error();
        int r = SSL_write(w->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(w->ssl, r);
        return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? -2 : -1;
    }
    ssize_t r = send(w->fd, buf, n, MSG_NOSIGNAL);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return -2;
    return r;
}

/* During a TLS login, the broker's alert refusing our certificate, if it
 * sent one: in TLS 1.3 it follows the handshake, and a write may fail on
 * the closed connection before a read has seen it. Returns the OpenSSL
 * error, or 0. */
static unsigned long refusal(wr_wire *w) {
    if (!w->ssl || w->state != W_HANDSHAKE) return 0;
    unsigned char scratch[64];
    ERR_clear_error();
    if (SSL_read(w->ssl, scratch, sizeof scratch) > 0) return 0;
    unsigned long e = ERR_peek_last_error();
    return wr_dial_refused_alert(e) ? e : 0;
}

/* Writes as much of the outbox as the socket takes now, up to a budget per
 * call (a broker reading as fast as we write would otherwise keep the loop
 * here for a whole large message); the rest waits for writability. Never
 * calls back. */
static void flush(wr_wire *w) {
    size_t budget = WRITE_BUDGET;
    while (w->head && w->fd >= 0) {
        if (budget == 0) {
            ev_io_start(w->loop, &w->wio);
            return;
        }
        chunk *c = w->head;
        size_t want = c->len - c->off < budget ? c->len - c->off : budget;
        ssize_t n = tx(w, bytes_of(c) + c->off, want);
        if (n == -2) {
            ev_io_start(w->loop, &w->wio);
            return;
        }
        if (n < 0) {
            int e = errno;
            unsigned long alert = refusal(w);
            if (alert)
                lose(w, WR_BROKER_REFUSED, "TLS: the broker refused the client certificate (%s)",
                     ERR_reason_error_string(alert));
            else
                lose(w, WR_BROKER_UNREACHABLE, "writing: %s", strerror(e));
            return;
        }
        w->last_out = ev_time(); /* not the loop's cached time: a job may have run long since */
        budget -= (size_t)n;
        c->off += (size_t)n;
        if (c->off < c->len) continue;
        w->head = c->next;
        if (!w->head) w->tail = NULL;
        free(c);
    }
    ev_io_stop(w->loop, &w->wio);
}

static void wio_cb(struct ev_loop *loop, ev_io *io, int revents) {
    (void)loop, (void)revents;
    flush(io->data);
}

/* Room for n more bytes at the end of the outbox; NULL when out of memory
 * (the connection is then lost). */
static chunk *append_chunk(wr_wire *w, size_t cap) {
    chunk *c = malloc(sizeof *c + cap);
    if (!c) {
        lose(w, WR_BROKER_UNREACHABLE, "out of memory");
        return NULL;
    }
    c->next = NULL;
    c->len = c->off = 0;
    c->cap = cap;
    c->ext = NULL;
    c->owner = NULL;
    if (w->tail)
        w->tail->next = c;
    else
        w->head = c;
    w->tail = c;
    return c;
}

static unsigned char *reserve(wr_wire *w, size_t n) {
    chunk *c = w->tail;
    if ((!c || c->ext || c->cap - c->len < n) &&
        !(c = append_chunk(w, n > CHUNK_MIN ? n : CHUNK_MIN)))
        return NULL;
    unsigned char *p = c->data + c->len;
    c->len += n;
    return p;
}

static void put16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}
static void put32(unsigned char *p, uint32_t v) {
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}
static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

/* Appends one frame whose payload is head (hlen bytes) then body. */
static int put_frame(wr_wire *w, uint8_t type, amqp_channel_t ch, const void *head, size_t hlen,
                     const void *body, size_t blen) {
    unsigned char *p = reserve(w, hlen + blen + FRAME_OVERHEAD);
    if (!p) return -1;
    p[0] = type;
    put16(p + 1, ch);
    put32(p + 3, (uint32_t)(hlen + blen));
    if (hlen) memcpy(p + 7, head, hlen);
    if (blen) memcpy(p + 7 + hlen, body, blen);
    p[7 + hlen + blen] = AMQP_FRAME_END;
    return 0;
}

static int encode_method(wr_wire *w, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
    put32(w->scratch, id);
    int n = amqp_encode_method(
        id, decoded, (amqp_bytes_t){(size_t)w->frame_max - FRAME_OVERHEAD - 4, w->scratch + 4});
    if (n < 0) {
        lose(w, WR_BROKER_FAILED, "cannot encode %s: %s", amqp_method_name(id),
             amqp_error_string2(n));
        return -1;
    }
    return put_frame(w, AMQP_FRAME_METHOD, ch, w->scratch, (size_t)n + 4, NULL, 0);
}

static int send_method(wr_wire *w, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
    if (encode_method(w, ch, id, decoded)) return -1;
    flush(w);
    return alive(w) ? 0 : -1;
}

int wr_wire_method(wr_wire *w, amqp_channel_t ch, amqp_method_number_t id, void *decoded) {
    if (w->state != W_READY) return -1;
    return send_method(w, ch, id, decoded);
}

/* Appends a body frame whose payload stays in the owner's memory. */
static int put_borrowed(wr_wire *w, amqp_channel_t ch, const unsigned char *bytes, size_t n,
                        const void *owner) {
    unsigned char *p = reserve(w, 7);
    if (!p) return -1;
    p[0] = AMQP_FRAME_BODY;
    put16(p + 1, ch);
    put32(p + 3, (uint32_t)n);
    chunk *c = append_chunk(w, 0);
    if (!c) return -1;
    c->ext = bytes;
    c->len = n;
    c->owner = owner;
    if (!(p = reserve(w, 1))) return -1;
    p[0] = AMQP_FRAME_END;
    return 0;
}

void wr_wire_detach(wr_wire *w, const void *owner) {
    for (chunk **link = &w->head; *link; link = &(*link)->next) {
        chunk *c = *link;
        if (!c->ext || c->owner != owner) continue;
        size_t n = c->len - c->off;
        chunk *own = malloc(sizeof *own + n);
        if (!own) {
            /* Without the bytes the frame cannot be finished. */
            lose(w, WR_BROKER_UNREACHABLE, "out of memory");
            return;
        }
        memcpy(own->data, c->ext + c->off, n);
        own->len = own->cap = n;
        own->off = 0;
        own->ext = NULL;
        own->owner = NULL;
        own->next = c->next;
        if (w->tail == c) w->tail = own;
        *link = own;
        free(c);
    }
}

int wr_wire_publish(wr_wire *w, amqp_channel_t ch, amqp_basic_publish_t *m,
                    const amqp_basic_properties_t *props, amqp_bytes_t body, const void *owner) {
    if (w->state != W_READY) return -1;
    if (encode_method(w, ch, AMQP_BASIC_PUBLISH_METHOD, m)) return -1;
    unsigned char *s = w->scratch;
    put16(s, AMQP_BASIC_CLASS);
    put16(s + 2, 0);
    put64(s + 4, body.len);
    int n =
        amqp_encode_properties(AMQP_BASIC_CLASS, (void *)props,
                               (amqp_bytes_t){(size_t)w->frame_max - FRAME_OVERHEAD - 12, s + 12});
    if (n < 0) {
        lose(w, WR_BROKER_FAILED, "cannot encode the properties: %s", amqp_error_string2(n));
        return -1;
    }
    if (put_frame(w, AMQP_FRAME_HEADER, ch, s, (size_t)n + 12, NULL, 0)) return -1;
    size_t room = (size_t)w->frame_max - FRAME_OVERHEAD;
    for (size_t off = 0; off < body.len; off += room) {
        size_t k = body.len - off < room ? body.len - off : room;
        const unsigned char *b = (const unsigned char *)body.bytes + off;
        if (owner && k >= WR_WIRE_BORROW_MIN ? put_borrowed(w, ch, b, k, owner)
                                             : put_frame(w, AMQP_FRAME_BODY, ch, b, k, NULL, 0))
            return -1;
    }
    flush(w);
    return alive(w) ? 0 : -1;
}

static void send_close(wr_wire *w, int code, const char *text) {
    amqp_connection_close_t m = {.reply_code = (uint16_t)code,
                                 .reply_text = amqp_cstring_bytes(text)};
    if (m.reply_text.len > 255) m.reply_text.len = 255; /* a short string */
    send_method(w, 0, AMQP_CONNECTION_CLOSE_METHOD, &m);
}

void wr_wire_end(wr_wire *w, int code, wr_broker_status st, const char *why) {
    if (!alive(w)) return;
    send_close(w, code, why);
    lose(w, st, "%s", why);
}

static void fail(wr_wire *w, int code, const char *why) {
    wr_wire_end(w, code, WR_BROKER_FAILED, why);
}

static amqp_table_entry_t entry_bool(const char *key, int v) {
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(key);
    e.value.kind = AMQP_FIELD_KIND_BOOLEAN;
    e.value.value.boolean = v;
    return e;
}

static amqp_table_entry_t entry_str(const char *key, const char *v) {
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(key);
    e.value.kind = AMQP_FIELD_KIND_UTF8;
    e.value.value.bytes = amqp_cstring_bytes(v);
    return e;
}

/* Whether the space-separated list names word. */
static bool offers(amqp_bytes_t list, const char *word) {
    size_t n = strlen(word);
    const char *p = list.bytes, *end = p + list.len;
    while (p < end) {
        const char *q = memchr(p, ' ', (size_t)(end - p));
        if (!q) q = end;
        if ((size_t)(q - p) == n && !memcmp(p, word, n)) return true;
        p = q + 1;
    }
    return false;
}

static void start_ok(wr_wire *w, const amqp_connection_start_t *m) {
    const char *mech = w->external ? "EXTERNAL" : "PLAIN";
    amqp_bytes_t mechs = m->mechanisms;
    if (!offers(mechs, mech)) {
        lose(w, w->external ? WR_BROKER_REFUSED : WR_BROKER_FAILED,
             "the broker does not offer %s login (offers: %.*s)%s", mech, (int)mechs.len,
             (char *)mechs.bytes,
             w->external ? "; enable its rabbitmq_auth_mechanism_ssl plugin, or put a password "
                           "in the URL"
                         : "");
        return;
    }
    amqp_table_entry_t caps[] = {
        entry_bool("consumer_cancel_notify", 1), entry_bool("connection.blocked", 1),
        entry_bool("authentication_failure_close", 1), entry_bool("publisher_confirms", 1)};
    amqp_table_entry_t props[3] = {entry_str("product", "warren"),
                                   entry_str("version", WARREN_VERSION)};
    props[2].key = amqp_cstring_bytes("capabilities");
    props[2].value.kind = AMQP_FIELD_KIND_TABLE;
    props[2].value.value.table = (amqp_table_t){4, caps};
    size_t ul = strlen(w->info.user), pl = strlen(w->info.password);
    if (w->external) ul = pl = 0; /* the certificate names the user */
    char *resp = malloc(ul + pl + 2);
    if (!resp) {
        lose(w, WR_BROKER_UNREACHABLE, "out of memory");
        return;
    }
    resp[0] = 0;
    memcpy(resp + 1, w->info.user, ul);
    resp[ul + 1] = 0;
    memcpy(resp + ul + 2, w->info.password, pl);
    amqp_connection_start_ok_t ok = {.client_properties = {3, props},
                                     .mechanism = amqp_cstring_bytes(mech),
                                     .response = {w->external ? 0 : ul + pl + 2, resp},
                                     .locale = amqp_cstring_bytes("en_US")};
    send_method(w, 0, AMQP_CONNECTION_START_OK_METHOD, &ok);
    memset(resp, 0, ul + pl + 2);
    free(resp);
}

static void beat_cb(struct ev_loop *loop, ev_timer *t, int revents);

static void tune_ok(wr_wire *w, const amqp_connection_tune_t *m) {
    int frame_max = m->frame_max && m->frame_max < FRAME_MAX ? (int)m->frame_max : FRAME_MAX;
    int hb = w->hb_asked;
    if (hb > 0 && m->heartbeat > 0 && m->heartbeat < hb) hb = m->heartbeat;
    if (frame_max < 4096 ||
        amqp_tune_connection(w->dec, m->channel_max, frame_max, hb) != AMQP_STATUS_OK) {
        lose(w, WR_BROKER_FAILED, "cannot use the broker's tuning (frame_max %u)", m->frame_max);
        return;
    }
    w->frame_max = frame_max;
    w->hb = hb;
    amqp_connection_tune_ok_t ok = {m->channel_max, (uint32_t)frame_max, (uint16_t)hb};
    if (send_method(w, 0, AMQP_CONNECTION_TUNE_OK_METHOD, &ok)) return;
    amqp_connection_open_t open = {amqp_cstring_bytes(w->info.vhost), amqp_empty_bytes, 0};
    send_method(w, 0, AMQP_CONNECTION_OPEN_METHOD, &open);
}

static void now_ready(wr_wire *w) {
    w->state = W_READY;
    ev_timer_stop(w->loop, &w->deadline);
    /* The handshake may have taken a while: count from a fresh clock. */
    ev_now_update(w->loop);
    w->last_in = w->last_out = ev_now(w->loop);
    if (w->hb > 0) {
        ev_timer_set(&w->beat, w->hb / 2.0, w->hb / 2.0);
        ev_timer_start(w->loop, &w->beat);
    }
    w->ev.ready(w->ud);
}

/* The broker closed the connection: answer, then report. */
static void closed_by_broker(wr_wire *w, const amqp_connection_close_t *m) {
    amqp_connection_close_ok_t ok = {0};
    bool login = w->state == W_HANDSHAKE;
    send_method(w, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
    wr_broker_status st = WR_BROKER_UNREACHABLE;
    if (login)
        st = m->reply_code == AMQP_ACCESS_REFUSED || m->reply_code == AMQP_NOT_ALLOWED
                 ? WR_BROKER_REFUSED
                 : WR_BROKER_FAILED;
    lose(w, st, "%s: %.*s", login ? "login refused" : "connection closed by the broker",
         (int)m->reply_text.len, (char *)m->reply_text.bytes);
}

static void handle(wr_wire *w, const amqp_frame_t *f) {
    if (f->frame_type == AMQP_FRAME_HEARTBEAT) return;
    bool conn_method = f->channel == 0 && f->frame_type == AMQP_FRAME_METHOD;
    amqp_method_number_t id = conn_method ? f->payload.method.id : 0;
    if (conn_method && id == AMQP_CONNECTION_CLOSE_METHOD) {
        closed_by_broker(w, f->payload.method.decoded);
        return;
    }
    switch (w->state) {
    case W_HANDSHAKE:
        if (id == AMQP_CONNECTION_START_METHOD)
            start_ok(w, f->payload.method.decoded);
        else if (id == AMQP_CONNECTION_TUNE_METHOD)
            tune_ok(w, f->payload.method.decoded);
        else if (id == AMQP_CONNECTION_OPEN_OK_METHOD)
            now_ready(w);
        else
            fail(w, AMQP_UNEXPECTED_FRAME,
                 "protocol error from the broker: unexpected frame at login");
        return;
    case W_READY:
        if (f->channel == 0 && id != AMQP_CONNECTION_BLOCKED_METHOD &&
            id != AMQP_CONNECTION_UNBLOCKED_METHOD) {
            fail(w, AMQP_UNEXPECTED_FRAME,
                 "protocol error from the broker: unexpected frame on channel 0");
            return;
        }
        w->ev.frame(w->ud, f);
        return;
    case W_CLOSING:
        /* After connection.close only close-ok counts (AMQP 0-9-1, 2.2.4). */
        if (id == AMQP_CONNECTION_CLOSE_OK_METHOD) {
            shut(w);
            w->state = W_DEAD;
            w->closed_st = WR_BROKER_OK;
            snprintf(w->closed_why, sizeof w->closed_why, "%s: closed", w->where);
            ev_timer_set(&w->report, 0, 0);
            ev_timer_start(w->loop, &w->report);
        }
        return;
    default:
        return;
    }
}

/* Decodes and handles every complete frame read so far. */
static void decode(wr_wire *w) {
    while (alive(w) && w->in_off < w->in_len) {
        amqp_frame_t f;
        int n =
            amqp_handle_input(w->dec, (amqp_bytes_t){w->in_len - w->in_off, w->in + w->in_off}, &f);
        if (n < 0) {
            char why[160];
            snprintf(why, sizeof why, "protocol error from the broker: undecodable frame (%s)",
                     amqp_error_string2(n));
            fail(w, AMQP_FRAME_ERROR, why);
            return;
        }
        w->in_off += (size_t)n;
        if (f.frame_type == 0) continue;
        handle(w, &f);
        amqp_maybe_release_buffers_on_channel(w->dec, f.channel);
    }
    if (w->in_off == w->in_len) w->in_off = w->in_len = 0;
}

/* Reads what fits into the input buffer. Returns the bytes read, 0 when
 * nothing was there or there is no room, -1 when the connection is over
 * (reported). */
static ssize_t fill(wr_wire *w) {
    if (w->in_off > 0 && w->in_off == w->in_len) w->in_off = w->in_len = 0;
    if (w->in_len == INBUF_SIZE) return 0;
    ssize_t n = rx(w, w->in + w->in_len, INBUF_SIZE - w->in_len);
    if (n == -2) return 0;
    if (n == 0) {
        lose(w, WR_BROKER_UNREACHABLE,
             w->state == W_HANDSHAKE ? "the broker closed the connection during login"
                                     : "the broker closed the connection");
        return -1;
    }
    if (n < 0) {
        unsigned long e = w->ssl ? ERR_peek_last_error() : 0;
        if (w->state == W_HANDSHAKE && wr_dial_refused_alert(e)) {
            /* TLS 1.3: the verdict on our certificate comes after the handshake. */
            lose(w, WR_BROKER_REFUSED, "TLS: the broker refused the client certificate (%s)",
                 ERR_reason_error_string(e));
            return -1;
        }
        lose(w, WR_BROKER_UNREACHABLE, "reading: %s",
             w->ssl ? (e && ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "TLS error")
                    : strerror(errno));
        return -1;
    }
    w->in_len += (size_t)n;
    w->last_in = ev_time(); /* not the loop's cached time: a job may have run long since */
    return n;
}

static void rio_cb(struct ev_loop *loop, ev_io *io, int revents) {
    (void)revents;
    wr_wire *w = io->data;
    /* Frames read ahead by keepalive come first. */
    decode(w);
    if (!alive(w) || fill(w) < 0) return;
    decode(w);
    /* TLS may hold decrypted bytes that make the socket readable no more. */
    if (alive(w) && w->ssl && SSL_pending(w->ssl) > 0) ev_feed_event(loop, io, EV_READ);
}

static void send_heartbeat(wr_wire *w, ev_tstamp now) {
    if (w->head || now - w->last_out < w->hb / 2.0) return;
    if (put_frame(w, AMQP_FRAME_HEARTBEAT, 0, NULL, 0, NULL, 0) == 0) flush(w);
}

static void beat_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)revents;
    wr_wire *w = t->data;
    ev_tstamp now = ev_now(loop);
    if (now - w->last_in > 2.0 * w->hb) {
        /* The read event of this very turn may not have run yet. */
        if (fill(w) < 0) return;
        if (w->in_len > w->in_off) ev_feed_event(loop, &w->rio, EV_READ);
        if (now - w->last_in > 2.0 * w->hb) {
            lose(w, WR_BROKER_UNREACHABLE, "no heartbeat from the broker for %d s", 2 * w->hb);
            return;
        }
    }
    send_heartbeat(w, now);
}

void wr_wire_keepalive(wr_wire *w) {
    if (w->state != W_READY && w->state != W_CLOSING) return;
    ev_tstamp now = ev_time();
    if (w->in_len < INBUF_SIZE) {
        ssize_t n = rx(w, w->in + w->in_len, INBUF_SIZE - w->in_len);
        if (n > 0) {
            w->in_len += (size_t)n;
            w->last_in = now;
        }
        /* Handled (or found at its end) by the read event on the next turn. */
        if (n != -2) ev_feed_event(w->loop, &w->rio, EV_READ);
    } else {
        w->last_in = now; /* a full buffer is life enough */
    }
    if (w->hb > 0 && !w->head && now - w->last_out >= w->hb / 2.0 &&
        put_frame(w, AMQP_FRAME_HEARTBEAT, 0, NULL, 0, NULL, 0) == 0) {
        ssize_t n = tx(w, bytes_of(w->head), w->head->len);
        if (n > 0) {
            w->head->off = (size_t)n;
            w->last_out = now;
        }
        if (w->head->off == w->head->len) {
            free(w->head);
            w->head = w->tail = NULL;
        } else {
            ev_io_start(w->loop, &w->wio);
        }
    }
}

static void deadline_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop, (void)revents;
    wr_wire *w = t->data;
    if (w->state == W_CLOSING)
        lose(w, WR_BROKER_UNREACHABLE, "the broker did not answer connection.close in time");
    else
        lose(w, WR_BROKER_UNREACHABLE, "no connection within %.1f s (%s)", w->timeout,
             w->state == W_DIALING ? "connecting" : "logging in");
}

static void dialed(void *ud, int fd, SSL *ssl, wr_dial_failure failure, const char *err) {
    wr_wire *w = ud;
    w->dial = NULL;
    if (fd < 0) {
        lose(w,
             failure == WR_DIAL_UNTRUSTED ? WR_BROKER_UNTRUSTED
             : failure == WR_DIAL_REFUSED ? WR_BROKER_REFUSED
                                          : WR_BROKER_UNREACHABLE,
             "%s", err);
        return;
    }
    w->fd = fd;
    w->ssl = ssl;
    w->state = W_HANDSHAKE;
    ev_io_set(&w->rio, fd, EV_READ);
    ev_io_set(&w->wio, fd, EV_WRITE);
    ev_io_start(w->loop, &w->rio);
    static const unsigned char header[8] = {'A', 'M', 'Q', 'P', 0, 0, 9, 1};
    unsigned char *p = reserve(w, sizeof header);
    if (!p) return;
    memcpy(p, header, sizeof header);
    flush(w);
}

wr_wire *wr_wire_new(struct ev_loop *loop, const wr_wire_events *ev, void *ud) {
    wr_wire *w = calloc(1, sizeof *w);
    if (!w || !(w->in = malloc(INBUF_SIZE)) || !(w->scratch = malloc(FRAME_MAX))) {
        if (w) free(w->in);
        free(w);
        return NULL;
    }
    w->loop = loop;
    w->ev = *ev;
    w->ud = ud;
    w->fd = -1;
    w->frame_max = FRAME_MAX;
    ev_io_init(&w->rio, rio_cb, -1, EV_READ);
    ev_io_init(&w->wio, wio_cb, -1, EV_WRITE);
    ev_timer_init(&w->deadline, deadline_cb, 0, 0);
    ev_timer_init(&w->beat, beat_cb, 0, 0);
    ev_timer_init(&w->report, report_cb, 0, 0);
    w->rio.data = w->wio.data = w->deadline.data = w->beat.data = w->report.data = w;
    return w;
}

void wr_wire_abort(wr_wire *w) {
    ev_timer_stop(w->loop, &w->report);
    if (w->fd >= 0) flush(w);
    shut(w);
    w->state = W_IDLE;
}

int wr_wire_open(wr_wire *w, const char *url, int heartbeat, double timeout, char *err,
                 size_t errlen) {
    wr_wire_abort(w);
    free(w->url);
    if (!(w->url = strdup(url)) || amqp_parse_url(w->url, &w->info) != AMQP_STATUS_OK) {
        snprintf(err, errlen, "invalid URL");
        return -1;
    }
    /* "amqp://host/" names the default vhost for users of most clients,
     * though the URI spec reads it as the empty one. */
    if (!w->info.vhost[0]) w->info.vhost = "/";
    /* A client certificate and no password in the URL: the certificate is
     * the login. */
    w->external = w->info.ssl && wr_dial_client_cert() && !wr_url_names_password(url);
    snprintf(w->where, sizeof w->where, "%s://%s%s%s:%d%s%s", w->info.ssl ? "amqps" : "amqp",
             w->external ? "" : w->info.user, w->external ? "" : "@", w->info.host, w->info.port,
             w->info.vhost[0] == '/' ? "" : "/", w->info.vhost);
    if (w->dec) amqp_destroy_connection(w->dec);
    if (!(w->dec = amqp_new_connection())) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    w->hb_asked = heartbeat;
    w->hb = 0;
    w->frame_max = FRAME_MAX;
    w->state = W_DIALING;
    w->dial = wr_dial_start(w->loop, w->info.host, w->info.port, w->info.ssl, dialed, w);
    if (!w->dial) {
        w->state = W_IDLE;
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    w->timeout = timeout;
    ev_timer_set(&w->deadline, timeout, 0);
    ev_timer_start(w->loop, &w->deadline);
    return 0;
}

const char *wr_wire_where(const wr_wire *w) {
    return w->where;
}

int wr_wire_close(wr_wire *w, double timeout) {
    if (w->state != W_READY) return -1;
    send_close(w, AMQP_REPLY_SUCCESS, "shutting down");
    if (w->state != W_READY) return 0; /* the write failed: lost, and reported */
    w->state = W_CLOSING;
    ev_timer_stop(w->loop, &w->beat);
    ev_timer_set(&w->deadline, timeout, 0);
    ev_timer_start(w->loop, &w->deadline);
    return 0;
}

void wr_wire_free(wr_wire *w) {
    if (!w) return;
    wr_wire_abort(w);
    if (w->dec) amqp_destroy_connection(w->dec);
    free(w->url);
    free(w->in);
    free(w->scratch);
    free(w);
}
