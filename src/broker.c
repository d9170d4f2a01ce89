#include "warren/broker.h"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "warren/log.h"

#define CHANNEL 1
#define PUBLISH_CHANNEL 2
#define FRAME_MAX 131072
#define CONNECT_SECONDS 5
#define CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

struct wr_broker {
    struct ev_loop *loop;
    const wr_config *cfg;
    wr_broker_events ev;
    void *ud;
    amqp_connection_state_t conn;
    size_t url_index; /* the URL to try first */
    char where[256];
    bool dead; /* lost: waiting for the host to close it */
    char why[256];
    amqp_bytes_t consumer_tag;
    wr_assembler assembler;
    wr_publisher *publisher;      /* channel 2 */
    wr_delivery *oldest, *newest; /* unsettled deliveries, in tag order */
    uint64_t *acks;               /* acks of this loop turn, not sent yet */
    size_t nacks, acks_cap;
    ev_prepare flush; /* sends them before the loop waits again */
    ev_io io;
    ev_timer beat;     /* pumps at half the heartbeat so heartbeats go out */
    ev_timer lost;     /* reports a loss from the loop's top level */
    ev_tstamp last_in; /* when the broker last sent anything */
};

static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents);

wr_broker *wr_broker_new(struct ev_loop *loop, const wr_config *cfg, const wr_broker_events *ev,
                         void *ud) {
    wr_broker *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->loop = loop;
    b->cfg = cfg;
    b->ev = *ev;
    b->ud = ud;
    /* Keep as many recycled deliveries as can be in flight at once, up to a bound. */
    wr_assembler_init(&b->assembler, cfg->prefetch < 1024 ? (size_t)cfg->prefetch + 1 : 1024);
    ev_prepare_init(&b->flush, flush_cb);
    b->flush.data = b;
    if (!(b->publisher = wr_publisher_new())) {
        free(b);
        return NULL;
    }
    return b;
}

bool wr_broker_connected(const wr_broker *b) {
    return b->conn && !b->dead;
}
const char *wr_broker_where(const wr_broker *b) {
    return b->where;
}

static void lost_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    wr_broker *b = w->data;
    b->ev.lost(b->ud, b->why);
}

/* Marks the connection lost and reports it on the next loop turn, so that a
 * failure seen deep inside a callback never unwinds through it. */
static void lose(wr_broker *b, const char *fmt, ...) {
    if (b->dead) return;
    b->dead = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->why, sizeof b->why, fmt, ap);
    va_end(ap);
    ev_io_stop(b->loop, &b->io);
    ev_timer_stop(b->loop, &b->beat);
    ev_timer_init(&b->lost, lost_cb, 0, 0);
    b->lost.data = b;
    ev_timer_start(b->loop, &b->lost);
}

static void reply_close_ok(wr_broker *b, amqp_channel_t ch, amqp_method_number_t id) {
    if (id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_ok_t ok = {0};
        amqp_send_method(b->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
    } else {
        amqp_channel_close_ok_t ok = {0};
        amqp_send_method(b->conn, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
    }
}

/* Turns a failed RPC into a status and a one-line message about what. */
static wr_broker_status describe(wr_broker *b, amqp_rpc_reply_t r, const char *what, char *err,
                                 size_t errlen) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return WR_BROKER_OK;
    case AMQP_RESPONSE_NONE:
        snprintf(err, errlen, "%s: %s: no reply from the broker", b->where, what);
        return WR_BROKER_FAILED;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(err, errlen, "%s: %s: %s", b->where, what, amqp_error_string2(r.library_error));
        return WR_BROKER_UNREACHABLE;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        break;
    }
    int code = 0;
    amqp_bytes_t text = {0, NULL};
    amqp_method_number_t id = r.reply.id;
    if (id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_t *m = r.reply.decoded;
        code = m->reply_code;
        text = m->reply_text;
    } else if (id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_t *m = r.reply.decoded;
        code = m->reply_code;
        text = m->reply_text;
    }
    reply_close_ok(b, CHANNEL, id);
    snprintf(err, errlen, "%s: %s: %.*s", b->where, what, (int)text.len,
             text.bytes ? (char *)text.bytes : "refused");
    if (code == AMQP_ACCESS_REFUSED || code == AMQP_NOT_ALLOWED) return WR_BROKER_REFUSED;
    if (code == AMQP_NOT_FOUND) return WR_BROKER_NO_QUEUE;
    return WR_BROKER_FAILED;
}

static void handle_method(wr_broker *b, const amqp_frame_t *f) {
    amqp_method_number_t id = f->payload.method.id;
    switch (id) {
    case AMQP_BASIC_CANCEL_METHOD: {
        const amqp_basic_cancel_t *m = f->payload.method.decoded;
        if (!m->nowait) {
            amqp_basic_cancel_ok_t ok = {m->consumer_tag};
            amqp_send_method(b->conn, CHANNEL, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
        }
        b->ev.cancelled(b->ud);
        break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD: {
        char err[256];
        amqp_rpc_reply_t r = {AMQP_RESPONSE_SERVER_EXCEPTION, f->payload.method, 0};
        describe(b, r,
                 id == AMQP_CHANNEL_CLOSE_METHOD ? "channel closed by the broker"
                                                 : "connection closed by the broker",
                 err, sizeof err);
        lose(b, "%s", err);
        break;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
        const amqp_connection_blocked_t *m = f->payload.method.decoded;
        wr_warn("broker blocked this connection: %.*s (acks go on, publishing waits)",
                (int)m->reason.len, (char *)m->reason.bytes);
        break;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD:
        wr_info("broker unblocked this connection");
        break;
    default:
        wr_debug("ignoring method 0x%08x on channel %u", id, f->channel);
        break;
    }
}

static void track(wr_broker *b, wr_delivery *d) {
    d->unsettled = true;
    d->newer = NULL;
    d->older = b->newest;
    if (b->newest)
        b->newest->newer = d;
    else
        b->oldest = d;
    b->newest = d;
}

static void untrack(wr_broker *b, wr_delivery *d) {
    if (!d->unsettled) return;
    if (d->older)
        d->older->newer = d->newer;
    else
        b->oldest = d->newer;
    if (d->newer)
        d->newer->older = d->older;
    else
        b->newest = d->older;
    d->unsettled = false;
    d->older = d->newer = NULL;
}

/* Forgets the unsettled deliveries and unsent acks of a channel that is
 * gone: their tags died with it. */
static void untrack_all(wr_broker *b) {
    while (b->oldest)
        untrack(b, b->oldest);
    b->nacks = 0;
}

/* Sends the acks of this loop turn: those below the oldest unsettled
 * delivery as one multiple ack (everything below it is settled), the others
 * one by one. One write instead of one per message is most of the cost of
 * a fast job. */
static void flush_acks(wr_broker *b) {
    if (b->nacks == 0 || !wr_broker_connected(b)) {
        b->nacks = 0;
        return;
    }
    uint64_t oldest = b->oldest ? b->oldest->tag : UINT64_MAX, below = 0;
    int rc = AMQP_STATUS_OK;
    for (size_t i = 0; i < b->nacks && rc == AMQP_STATUS_OK; i++) {
        if (b->acks[i] < oldest)
            below = b->acks[i] > below ? b->acks[i] : below;
        else
            rc = amqp_basic_ack(b->conn, CHANNEL, b->acks[i], 0);
    }
    if (below && rc == AMQP_STATUS_OK) rc = amqp_basic_ack(b->conn, CHANNEL, below, 1);
    b->nacks = 0;
    if (rc != AMQP_STATUS_OK) lose(b, "%s: acking: %s", b->where, amqp_error_string2(rc));
}

static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents) {
    (void)revents;
    wr_broker *b = w->data;
    ev_prepare_stop(loop, w);
    flush_acks(b);
}

static void dispatch(wr_broker *b, const amqp_frame_t *f) {
    if (f->channel == PUBLISH_CHANNEL) {
        if (wr_publisher_frame(b->publisher, f))
            lose(b, "%s: the connection failed while publishing", b->where);
        return;
    }
    if (f->channel == CHANNEL) {
        wr_delivery *d;
        int r = wr_assembler_feed(&b->assembler, f, &d);
        if (r == WR_FRAME_DONE) {
            /* Its bytes are copied out: rabbitmq-c may reuse the channel's
             * pool pages now rather than keep every page a burst needed. */
            amqp_maybe_release_buffers_on_channel(b->conn, CHANNEL);
            track(b, d);
            b->ev.delivery(b->ud, d);
            return;
        }
        if (r == WR_FRAME_ERROR) {
            lose(b, "%s: malformed delivery (frames out of order or out of memory)", b->where);
            return;
        }
        if (r == WR_FRAME_PART) return;
    }
    if (f->frame_type == AMQP_FRAME_METHOD) handle_method(b, f);
}

/* Reads and dispatches every frame that is available without blocking,
 * including those rabbitmq-c has already buffered (they do not make the
 * socket readable again). A zero timeout also sends a due heartbeat. */
static void pump(wr_broker *b) {
    amqp_frame_t f;
    struct timeval zero = {0, 0};
    while (b->conn && !b->dead) {
        int rc = amqp_simple_wait_frame_noblock(b->conn, &f, &zero);
        if (rc == AMQP_STATUS_TIMEOUT) break;
        if (rc != AMQP_STATUS_OK) {
            lose(b, "%s: %s", b->where, amqp_error_string2(rc));
            return;
        }
        dispatch(b, &f);
        /* Nothing buffered: the socket's watcher says when more comes. One
         * more call here would cost a recv and a poll that find nothing. */
        if (!b->conn || b->dead ||
            (!amqp_frames_enqueued(b->conn) && !amqp_data_in_buffer(b->conn)))
            break;
    }
    if (b->conn && !b->dead) amqp_maybe_release_buffers(b->conn);
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents) {
    (void)revents;
    wr_broker *b = w->data;
    b->last_in = ev_now(loop);
    pump(b);
}

static void beat_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)revents;
    wr_broker *b = w->data;
    int hb = b->cfg->heartbeat;
    if (hb > 0 && ev_now(loop) - b->last_in > 2.0 * hb) {
        lose(b, "%s: no heartbeat from the broker for %d s", b->where, 2 * hb);
        return;
    }
    pump(b);
}

static void destroy(wr_broker *b) {
    ev_io_stop(b->loop, &b->io);
    ev_timer_stop(b->loop, &b->beat);
    ev_timer_stop(b->loop, &b->lost);
    ev_prepare_stop(b->loop, &b->flush);
    untrack_all(b);
    wr_assembler_reset(&b->assembler);
    wr_publisher_bind(b->publisher, NULL);
    amqp_bytes_free(b->consumer_tag);
    b->consumer_tag = amqp_empty_bytes;
    if (b->conn) amqp_destroy_connection(b->conn);
    b->conn = NULL;
    b->dead = false;
}

/* Opens channel 1 and applies qos. Delivery tags belong to one channel
 * instance: deliveries of an earlier opening can no longer be settled. */
static wr_broker_status open_channel(wr_broker *b, char *err, size_t errlen) {
    untrack_all(b);
    amqp_channel_open(b->conn, CHANNEL);
    wr_broker_status st =
        describe(b, amqp_get_rpc_reply(b->conn), "opening a channel", err, errlen);
    if (st) return st;
    amqp_basic_qos(b->conn, CHANNEL, 0, (uint16_t)b->cfg->prefetch, 0);
    st = describe(b, amqp_get_rpc_reply(b->conn), "setting prefetch", err, errlen);
    if (st) return st;
    return WR_BROKER_OK;
}

wr_broker_status wr_broker_consume(wr_broker *b, char *err, size_t errlen) {
    const wr_config *c = b->cfg;
    amqp_bytes_t queue = amqp_cstring_bytes(c->queue);
    amqp_queue_declare(b->conn, CHANNEL, queue, !c->declare, c->declare, 0, 0, amqp_empty_table);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(b->conn);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char why[256];
        wr_broker_status st = describe(b, r, "checking the queue", why, sizeof why);
        if (st == WR_BROKER_NO_QUEUE)
            snprintf(err, errlen, "%s: queue '%s' not found (create it, or pass --declare)",
                     b->where, c->queue);
        else
            snprintf(err, errlen, "%s", why);
        /* The channel is closed after an error: re-open it for a later retry. */
        if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
            r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
            open_channel(b, why, sizeof why);
        return st;
    }
    amqp_basic_consume_ok_t *ok =
        amqp_basic_consume(b->conn, CHANNEL, queue, amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    wr_broker_status st = describe(b, amqp_get_rpc_reply(b->conn), "consuming", err, errlen);
    if (st) return st;
    amqp_bytes_free(b->consumer_tag);
    b->consumer_tag = amqp_bytes_malloc_dup(ok->consumer_tag);
    return WR_BROKER_OK;
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

/* One attempt against one URL. */
static wr_broker_status connect_one(wr_broker *b, const char *url, char *err, size_t errlen) {
    char *copy = strdup(url);
    struct amqp_connection_info info;
    if (!copy || amqp_parse_url(copy, &info) != AMQP_STATUS_OK) {
        free(copy);
        snprintf(err, errlen, "invalid URL");
        return WR_BROKER_FAILED;
    }
    /* "amqp://host/" names the default vhost for users of most clients,
     * though the URI spec reads it as the empty one. */
    if (!info.vhost[0]) info.vhost = "/";
    snprintf(b->where, sizeof b->where, "%s://%s@%s:%d%s%s", info.ssl ? "amqps" : "amqp", info.user,
             info.host, info.port, info.vhost[0] == '/' ? "" : "/", info.vhost);
    wr_broker_status st = WR_BROKER_UNREACHABLE;
    b->conn = amqp_new_connection();
    amqp_socket_t *sock = NULL;
    if (b->conn) sock = info.ssl ? amqp_ssl_socket_new(b->conn) : amqp_tcp_socket_new(b->conn);
    if (!sock) {
        snprintf(err, errlen, "%s: out of memory", b->where);
        goto fail;
    }
    if (info.ssl && access(CA_BUNDLE, R_OK) == 0) amqp_ssl_socket_set_cacert(sock, CA_BUNDLE);
    struct timeval tv = {CONNECT_SECONDS, 0};
    amqp_set_handshake_timeout(b->conn, &tv);
    amqp_set_rpc_timeout(b->conn, &tv);
    int rc = amqp_socket_open_noblock(sock, info.host, info.port, &tv);
    if (rc != AMQP_STATUS_OK) {
        snprintf(err, errlen, "%s: cannot connect: %s", b->where, amqp_error_string2(rc));
        goto fail;
    }
    amqp_table_entry_t caps[] = {
        entry_bool("consumer_cancel_notify", 1), entry_bool("connection.blocked", 1),
        entry_bool("authentication_failure_close", 1), entry_bool("publisher_confirms", 1)};
    amqp_table_entry_t props[3] = {entry_str("product", "warren"),
                                   entry_str("version", WARREN_VERSION)};
    props[2].key = amqp_cstring_bytes("capabilities");
    props[2].value.kind = AMQP_FIELD_KIND_TABLE;
    props[2].value.value.table = (amqp_table_t){4, caps};
    amqp_table_t client = {3, props};
    amqp_rpc_reply_t r =
        amqp_login_with_properties(b->conn, info.vhost, 0, FRAME_MAX, b->cfg->heartbeat, &client,
                                   AMQP_SASL_METHOD_PLAIN, info.user, info.password);
    if ((st = describe(b, r, "logging in", err, errlen))) goto fail;
    if ((st = open_channel(b, err, errlen))) goto fail;
    if ((st = wr_broker_consume(b, err, errlen))) goto fail;
    free(copy);
    return WR_BROKER_OK;
fail:
    free(copy);
    destroy(b);
    return st;
}

wr_broker_status wr_broker_connect(wr_broker *b, char *err, size_t errlen) {
    if (b->conn) destroy(b);
    wr_broker_status st = WR_BROKER_UNREACHABLE;
    size_t n = b->cfg->nurls;
    for (size_t k = 0; k < n; k++) {
        size_t i = (b->url_index + k) % n;
        st = connect_one(b, b->cfg->urls[i], err, errlen);
        if (st == WR_BROKER_OK) {
            b->url_index = i;
            break;
        }
        if (n > 1) wr_debug("%s", err);
    }
    if (st != WR_BROKER_OK) {
        /* Next time start with the node after the one that failed last. */
        b->url_index = (b->url_index + 1) % n;
        return st;
    }
    b->last_in = ev_now(b->loop);
    wr_publisher_bind(b->publisher, b->conn);
    ev_io_init(&b->io, io_cb, amqp_get_sockfd(b->conn), EV_READ);
    b->io.data = b;
    ev_io_start(b->loop, &b->io);
    if (b->cfg->heartbeat > 0) {
        ev_timer_init(&b->beat, beat_cb, b->cfg->heartbeat / 2.0, b->cfg->heartbeat / 2.0);
        b->beat.data = b;
        ev_timer_start(b->loop, &b->beat);
    }
    /* Frames may already be buffered from the handshake: pump on the next
     * loop turn, once the caller knows it is connected. */
    ev_feed_event(b->loop, &b->io, EV_READ);
    return WR_BROKER_OK;
}

int wr_broker_settle(wr_broker *b, wr_delivery *d, wr_settle how) {
    if (!wr_broker_connected(b) || !d->unsettled) return -1;
    untrack(b, d);
    if (how == WR_SETTLE_ACK) {
        if (b->nacks == b->acks_cap) {
            size_t cap = b->acks_cap ? 2 * b->acks_cap : 64;
            uint64_t *grown = realloc(b->acks, cap * sizeof *grown);
            if (!grown) {
                lose(b, "%s: out of memory while acking", b->where);
                return -1;
            }
            b->acks = grown;
            b->acks_cap = cap;
        }
        b->acks[b->nacks++] = d->tag;
        ev_prepare_start(b->loop, &b->flush);
        return 0;
    }
    int rc = how == WR_SETTLE_REQUEUE ? amqp_basic_nack(b->conn, CHANNEL, d->tag, 0, 1)
                                      : amqp_basic_reject(b->conn, CHANNEL, d->tag, 0);
    if (rc != AMQP_STATUS_OK) {
        lose(b, "%s: settling: %s", b->where, amqp_error_string2(rc));
        return -1;
    }
    return 0;
}

wr_publisher *wr_broker_publisher(wr_broker *b) {
    return b->publisher;
}

void wr_broker_release(wr_broker *b, wr_delivery *d) {
    untrack(b, d);
    wr_delivery_release(&b->assembler, d);
}

int wr_broker_cancel(wr_broker *b) {
    if (!wr_broker_connected(b) || !b->consumer_tag.len) return -1;
    amqp_basic_cancel_t req = {b->consumer_tag, 0};
    int rc = amqp_send_method(b->conn, CHANNEL, AMQP_BASIC_CANCEL_METHOD, &req);
    if (rc != AMQP_STATUS_OK) {
        lose(b, "%s: cancelling: %s", b->where, amqp_error_string2(rc));
        return -1;
    }
    return 0;
}

void wr_broker_close(wr_broker *b, double timeout) {
    if (!b->conn) return;
    if (!b->dead) {
        flush_acks(b);
        struct timeval tv = {(time_t)timeout, (suseconds_t)((timeout - (time_t)timeout) * 1e6)};
        amqp_set_rpc_timeout(b->conn, &tv);
        amqp_channel_close(b->conn, CHANNEL, AMQP_REPLY_SUCCESS);
        amqp_connection_close(b->conn, AMQP_REPLY_SUCCESS);
    }
    destroy(b);
}

void wr_broker_free(wr_broker *b) {
    if (!b) return;
    destroy(b);
    wr_assembler_free(&b->assembler);
    wr_publisher_free(b->publisher);
    free(b->acks);
    free(b);
}
