#include "warren/broker.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/ledger.h"
#include "warren/log.h"

/* What one URL gets of a connection attempt, at most. */
#define CONNECT_SECONDS 5.0

typedef enum {
    B_DOWN,       /* no connection */
    B_CONNECTING, /* wire dialing or logging in */
    B_OPEN,       /* logged in: the channels are opening or open */
    B_CLOSING,    /* connection.close sent */
} phase;

/* Where a queue's channel is. */
typedef enum {
    C_CLOSED,
    C_OPENING,     /* channel.open sent */
    C_QOS,         /* basic.qos sent */
    C_IDLE,        /* open, not consuming */
    C_DECLARING,   /* queue.declare sent */
    C_SUBSCRIBING, /* basic.consume sent */
    C_CONSUMING,
    C_CANCELLING, /* basic.cancel sent */
} chan_phase;

/* The channel of one queue: number index + 1. */
typedef struct chan {
    chan_phase phase;
    bool consume_now; /* once open, consume (not just idle) */
    const wr_queue_conf *queue;
    char consumer_tag[256];
    unsigned epoch;       /* the current opening; see wr_delivery.epoch */
    unsigned depth_asked; /* passive declares sent by wr_broker_ask_depth, not answered */
    wr_assembler assembler;
    wr_ledger ledger;
} chan;

struct wr_broker {
    struct ev_loop *loop;
    const wr_config *cfg;
    wr_broker_events ev;
    void *ud;
    wr_wire *wire;
    phase phase;
    bool attempt;     /* connecting: failures try the next URL */
    size_t url_index; /* the URL to try first */
    size_t tried;     /* URLs tried in this attempt */
    ev_tstamp attempt_end;
    chan *chans; /* one per queue */
    size_t nchans;
    uint64_t *singles;
    size_t singles_cap;
    wr_publisher *publisher;
    ev_prepare flush; /* sends the loop turn's acks before the loop waits */
};

static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents);
static void wire_ready(void *ud);
static void wire_frame(void *ud, const amqp_frame_t *f);
static void wire_closed(void *ud, wr_broker_status st, const char *why);

wr_broker *wr_broker_new(struct ev_loop *loop, const wr_config *cfg, const wr_broker_events *ev,
                         void *ud) {
    wr_broker *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->loop = loop;
    b->cfg = cfg;
    b->ev = *ev;
    b->ud = ud;
    ev_prepare_init(&b->flush, flush_cb);
    b->flush.data = b;
    static const wr_wire_events wev = {wire_ready, wire_frame, wire_closed};
    if (!(b->chans = calloc(cfg->nqueues, sizeof *b->chans)) ||
        !(b->wire = wr_wire_new(loop, &wev, b)) || !(b->publisher = wr_publisher_new(loop))) {
        wr_broker_free(b);
        return NULL;
    }
    b->nchans = cfg->nqueues;
    for (size_t i = 0; i < b->nchans; i++) {
        chan *c = &b->chans[i];
        c->queue = &cfg->queues[i];
        /* Keep as many recycled deliveries as can be in flight at once, up to a bound. */
        int pf = c->queue->prefetch;
        wr_assembler_init(&c->assembler, pf < 1024 ? (size_t)pf + 1 : 1024);
        wr_ledger_init(&c->ledger);
    }
    return b;
}

bool wr_broker_connected(const wr_broker *b) {
    return b->phase == B_OPEN;
}
const char *wr_broker_where(const wr_broker *b) {
    return wr_wire_where(b->wire);
}
wr_publisher *wr_broker_publisher(wr_broker *b) {
    return b->publisher;
}

static amqp_channel_t number(const wr_broker *b, const chan *c) {
    return (amqp_channel_t)(c - b->chans + 1);
}

/* A channel opening is over: its tags and any half-assembled delivery die. */
static void end_channel(chan *c) {
    c->epoch++;
    c->depth_asked = 0;
    c->phase = C_CLOSED;
    wr_ledger_reset(&c->ledger);
    wr_assembler_reset(&c->assembler);
}

/* The connection is over: every channel with it. */
static void end_channels(wr_broker *b) {
    for (size_t i = 0; i < b->nchans; i++)
        end_channel(&b->chans[i]);
    ev_prepare_stop(b->loop, &b->flush);
}

static int method(wr_broker *b, chan *c, amqp_method_number_t id, void *m) {
    return wr_wire_method(b->wire, c ? number(b, c) : 0, id, m);
}

static void open_url(wr_broker *b);

/* A connection attempt failed at one URL: the next, or report. */
static void attempt_failed(wr_broker *b, wr_broker_status st, const char *why) {
    wr_wire_abort(b->wire);
    end_channels(b);
    b->phase = B_DOWN;
    size_t n = b->cfg->nurls;
    if (++b->tried < n && ev_now(b->loop) < b->attempt_end) {
        wr_debug("%s", why);
        b->url_index = (b->url_index + 1) % n;
        open_url(b);
        return;
    }
    /* Next time start with the node after the one that failed last. */
    b->url_index = (b->url_index + 1) % n;
    b->attempt = false;
    b->ev.failed(b->ud, WR_ALL_QUEUES, st, why);
}

static void open_url(wr_broker *b) {
    ev_now_update(b->loop);
    double left = b->attempt_end - ev_now(b->loop);
    char err[256];
    b->phase = B_CONNECTING;
    wr_debug("connecting to URL %zu of %zu", b->url_index + 1, b->cfg->nurls);
    if (wr_wire_open(b->wire, b->cfg->urls[b->url_index], b->cfg->heartbeat,
                     left < CONNECT_SECONDS ? left : CONNECT_SECONDS, err, sizeof err))
        attempt_failed(b, WR_BROKER_FAILED, err);
}

void wr_broker_connect(wr_broker *b, double timeout) {
    ev_now_update(b->loop);
    b->attempt = true;
    b->tried = 0;
    b->attempt_end = ev_now(b->loop) + (timeout > 0 ? timeout : 1e9);
    open_url(b);
}

/* The consuming connection ends: as a failed attempt, or as a loss. */
static void connection_over(wr_broker *b, wr_broker_status st, const char *why) {
    if (b->attempt) {
        attempt_failed(b, st, why);
        return;
    }
    phase was = b->phase;
    wr_wire_abort(b->wire);
    end_channels(b);
    b->phase = B_DOWN;
    if (was == B_CLOSING)
        b->ev.closed(b->ud, st == WR_BROKER_OK);
    else if (was != B_DOWN)
        b->ev.lost(b->ud, why);
}

/* The broker broke the protocol: say why, close, and report. */
static void violation(wr_broker *b, const char *fmt, ...) {
    char why[300];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(why, sizeof why, "protocol error from the broker: ");
    vsnprintf(why + n, sizeof why - (size_t)n, fmt, ap);
    va_end(ap);
    wr_wire_end(b->wire, AMQP_UNEXPECTED_FRAME, WR_BROKER_FAILED, why);
}

static void wire_closed(void *ud, wr_broker_status st, const char *why) {
    connection_over(ud, st, why);
}

static void open_channel(wr_broker *b, chan *c, bool consume) {
    end_channel(c);
    amqp_channel_open_t m = {amqp_empty_bytes};
    c->phase = C_OPENING;
    c->consume_now = consume;
    method(b, c, AMQP_CHANNEL_OPEN_METHOD, &m);
}

static void wire_ready(void *ud) {
    wr_broker *b = ud;
    wr_publisher_target(b->publisher, b->cfg->urls[b->url_index], b->cfg->heartbeat);
    b->phase = B_OPEN;
    for (size_t i = 0; i < b->nchans; i++)
        open_channel(b, &b->chans[i], true);
}

static void declare(wr_broker *b, chan *c) {
    amqp_queue_declare_t m = {.queue = amqp_cstring_bytes(c->queue->name),
                              .passive = !b->cfg->declare,
                              .durable = b->cfg->declare,
                              .arguments = amqp_empty_table};
    c->phase = C_DECLARING;
    method(b, c, AMQP_QUEUE_DECLARE_METHOD, &m);
}

int wr_broker_ask_depth(wr_broker *b, size_t q) {
    chan *c = &b->chans[q];
    if (b->phase != B_OPEN || c->phase != C_CONSUMING) return -1;
    amqp_queue_declare_t m = {
        .queue = amqp_cstring_bytes(c->queue->name), .passive = 1, .arguments = amqp_empty_table};
    if (method(b, c, AMQP_QUEUE_DECLARE_METHOD, &m)) return -1;
    c->depth_asked++;
    return 0;
}

int wr_broker_consume(wr_broker *b, size_t q) {
    chan *c = &b->chans[q];
    if (b->phase != B_OPEN || c->phase != C_IDLE) return -1;
    declare(b, c);
    return 0;
}

/* Whether every queue is consumed: the end of a connection attempt. */
static bool all_consuming(const wr_broker *b) {
    for (size_t i = 0; i < b->nchans; i++)
        if (b->chans[i].phase != C_CONSUMING) return false;
    return true;
}

/* A reply on a queue's channel moved its set-up along. */
static void step(wr_broker *b, chan *c, amqp_method_number_t id, const void *decoded) {
    /* The answer to wr_broker_ask_depth: asked while consuming, it may come
     * during the cancel that followed; replies come in order, so it is never
     * confused with the set-up's own declare. */
    if (id == AMQP_QUEUE_DECLARE_OK_METHOD && c->depth_asked > 0 && c->phase != C_DECLARING) {
        c->depth_asked--;
        const amqp_queue_declare_ok_t *ok = decoded;
        b->ev.depth(b->ud, (size_t)(c - b->chans), ok->message_count);
        return;
    }
    switch (c->phase) {
    case C_OPENING:
        if (id != AMQP_CHANNEL_OPEN_OK_METHOD) break;
        c->phase = C_QOS;
        amqp_basic_qos_t qos = {0, (uint16_t)c->queue->prefetch, 0};
        method(b, c, AMQP_BASIC_QOS_METHOD, &qos);
        return;
    case C_QOS:
        if (id != AMQP_BASIC_QOS_OK_METHOD) break;
        c->phase = C_IDLE;
        if (c->consume_now) declare(b, c);
        return;
    case C_DECLARING:
        if (id != AMQP_QUEUE_DECLARE_OK_METHOD) break;
        c->phase = C_SUBSCRIBING;
        amqp_basic_consume_t m = {.queue = amqp_cstring_bytes(c->queue->name),
                                  .consumer_tag = amqp_empty_bytes,
                                  .arguments = amqp_empty_table};
        method(b, c, AMQP_BASIC_CONSUME_METHOD, &m);
        return;
    case C_SUBSCRIBING: {
        if (id != AMQP_BASIC_CONSUME_OK_METHOD) break;
        const amqp_basic_consume_ok_t *ok = decoded;
        snprintf(c->consumer_tag, sizeof c->consumer_tag, "%.*s", (int)ok->consumer_tag.len,
                 (char *)ok->consumer_tag.bytes);
        c->phase = C_CONSUMING;
        c->consume_now = false;
        if (!b->attempt) {
            b->ev.consuming(b->ud, (size_t)(c - b->chans));
        } else if (all_consuming(b)) {
            b->attempt = false;
            b->ev.consuming(b->ud, WR_ALL_QUEUES);
        }
        return;
    }
    case C_CANCELLING:
        if (id != AMQP_BASIC_CANCEL_OK_METHOD) break;
        c->phase = C_IDLE;
        return;
    default:
        break;
    }
    violation(b, "unexpected %s on channel %u", amqp_method_name(id), (unsigned)number(b, c));
}

/* The broker closed a queue's channel (a missing queue, an access error...). */
static void channel_closed(wr_broker *b, chan *c, const amqp_channel_close_t *m) {
    amqp_channel_close_ok_t ok = {0};
    method(b, c, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
    bool missing = m->reply_code == AMQP_NOT_FOUND && c->phase == C_DECLARING;
    /* --declare met a queue with other arguments (a quorum queue, a
     * dead-letter exchange): no retry can change that. */
    bool differs = m->reply_code == AMQP_PRECONDITION_FAILED && c->phase == C_DECLARING;
    wr_broker_status st = missing || differs                     ? WR_BROKER_NO_QUEUE
                          : m->reply_code == AMQP_ACCESS_REFUSED ? WR_BROKER_REFUSED
                                                                 : WR_BROKER_FAILED;
    char why[400];
    if (missing)
        snprintf(why, sizeof why, "queue '%s' not found (create it, or pass --declare)",
                 c->queue->name);
    else if (differs)
        snprintf(why, sizeof why,
                 "queue '%s' exists with other arguments than --declare gives (%.*s); run "
                 "without --declare to consume it as it is",
                 c->queue->name, (int)m->reply_text.len, (char *)m->reply_text.bytes);
    else
        snprintf(why, sizeof why, "channel of queue '%s' closed by the broker: %.*s",
                 c->queue->name, (int)m->reply_text.len, (char *)m->reply_text.bytes);
    if (!b->attempt && (c->phase == C_DECLARING || c->phase == C_SUBSCRIBING)) {
        /* A re-consume failed: re-open the channel for a later try. */
        char err[512];
        snprintf(err, sizeof err, "%s: %s", wr_broker_where(b), why);
        open_channel(b, c, false);
        b->ev.failed(b->ud, (size_t)(c - b->chans), st, err);
        return;
    }
    /* Reported from the loop's top level: an attempt that failed, or a loss. */
    wr_wire_end(b->wire, AMQP_REPLY_SUCCESS, b->attempt ? st : WR_BROKER_UNREACHABLE, why);
}

static bool our_tag(const chan *c, amqp_bytes_t tag) {
    return tag.len == strlen(c->consumer_tag) && !memcmp(tag.bytes, c->consumer_tag, tag.len);
}

static void delivered(wr_broker *b, chan *c, const amqp_frame_t *f) {
    wr_delivery *d;
    if (f->frame_type == AMQP_FRAME_METHOD && f->payload.method.id == AMQP_BASIC_DELIVER_METHOD) {
        const amqp_basic_deliver_t *m = f->payload.method.decoded;
        if (c->phase != C_CONSUMING && c->phase != C_CANCELLING) {
            violation(b, "a delivery while not consuming");
            return;
        }
        if (!our_tag(c, m->consumer_tag)) {
            violation(b, "a delivery for another consumer");
            return;
        }
        if (wr_ledger_receive(&c->ledger, m->delivery_tag)) {
            violation(b, "delivery tag %llu out of sequence", (unsigned long long)m->delivery_tag);
            return;
        }
    }
    int r = wr_assembler_feed(&c->assembler, f, &d);
    if (r == WR_FRAME_ERROR) {
        violation(b, "delivery frames out of order (a short or long body, or content without "
                     "a method)");
        return;
    }
    if (r != WR_FRAME_DONE) return;
    d->epoch = c->epoch;
    d->qi = (size_t)(c - b->chans);
    d->queue = c->queue->name;
    b->ev.delivery(b->ud, d);
}

static void wire_frame(void *ud, const amqp_frame_t *f) {
    wr_broker *b = ud;
    if (f->channel == 0) {
        if (f->payload.method.id == AMQP_CONNECTION_BLOCKED_METHOD)
            wr_warn("the broker blocked the consuming connection (it should not: it never "
                    "publishes)");
        return;
    }
    chan *c = f->channel <= b->nchans ? &b->chans[f->channel - 1] : NULL;
    if (!c || c->phase == C_CLOSED) {
        violation(b, "a frame on channel %u, which is not open", f->channel);
        return;
    }
    if (f->frame_type != AMQP_FRAME_METHOD || f->payload.method.id == AMQP_BASIC_DELIVER_METHOD ||
        c->assembler.cur) {
        delivered(b, c, f);
        return;
    }
    amqp_method_number_t id = f->payload.method.id;
    switch (id) {
    case AMQP_CHANNEL_CLOSE_METHOD:
        channel_closed(b, c, f->payload.method.decoded);
        return;
    case AMQP_BASIC_CANCEL_METHOD: {
        const amqp_basic_cancel_t *m = f->payload.method.decoded;
        if (!our_tag(c, m->consumer_tag) || (c->phase != C_CONSUMING && c->phase != C_CANCELLING)) {
            violation(b, "basic.cancel for a consumer that is not ours");
            return;
        }
        if (!m->nowait) {
            amqp_basic_cancel_ok_t ok = {m->consumer_tag};
            method(b, c, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
        }
        bool ours = c->phase == C_CANCELLING;
        c->phase = C_IDLE;
        if (!ours) b->ev.cancelled(b->ud, (size_t)(c - b->chans));
        return;
    }
    default:
        step(b, c, id, f->payload.method.decoded);
    }
}

/* Sends the acks of this loop turn on one channel (wr_ledger_flush says
 * how). One write instead of one per message is most of the cost of a fast
 * job. */
static void flush_acks(wr_broker *b, chan *c) {
    size_t n = wr_ledger_collected(&c->ledger);
    if (n == 0) return;
    if (n > b->singles_cap) {
        uint64_t *grown = realloc(b->singles, n * sizeof *grown);
        if (!grown) {
            wr_wire_end(b->wire, AMQP_INTERNAL_ERROR, WR_BROKER_FAILED,
                        "out of memory while acking");
            return;
        }
        b->singles = grown;
        b->singles_cap = n;
    }
    uint64_t multiple;
    size_t nsingles;
    wr_ledger_flush(&c->ledger, &multiple, b->singles, &nsingles);
    for (size_t i = 0; i < nsingles; i++) {
        amqp_basic_ack_t m = {b->singles[i], 0};
        method(b, c, AMQP_BASIC_ACK_METHOD, &m);
    }
    if (multiple) {
        amqp_basic_ack_t m = {multiple, 1};
        method(b, c, AMQP_BASIC_ACK_METHOD, &m);
    }
}

static void flush_all(wr_broker *b) {
    for (size_t i = 0; i < b->nchans && b->phase == B_OPEN; i++)
        flush_acks(b, &b->chans[i]);
}

static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents) {
    (void)revents;
    ev_prepare_stop(loop, w);
    flush_all(w->data);
}

int wr_broker_settle(wr_broker *b, wr_delivery *d, wr_settle how) {
    if (!wr_broker_connected(b) || d->qi >= b->nchans) return -1;
    chan *c = &b->chans[d->qi];
    if (c->phase == C_CLOSED || d->epoch != c->epoch) return -1;
    if (wr_ledger_settle(&c->ledger, d->tag, how == WR_SETTLE_ACK)) return -1;
    if (how == WR_SETTLE_ACK) {
        ev_prepare_start(b->loop, &b->flush);
        return 0;
    }
    int rc;
    if (how == WR_SETTLE_REQUEUE) {
        amqp_basic_nack_t m = {d->tag, 0, 1};
        rc = method(b, c, AMQP_BASIC_NACK_METHOD, &m);
    } else {
        amqp_basic_reject_t m = {d->tag, 0};
        rc = method(b, c, AMQP_BASIC_REJECT_METHOD, &m);
    }
    return rc;
}

void wr_broker_release(wr_broker *b, wr_delivery *d) {
    wr_delivery_release(&b->chans[d->qi].assembler, d);
}

int wr_broker_cancel(wr_broker *b, size_t q) {
    chan *c = &b->chans[q];
    if (b->phase != B_OPEN || c->phase != C_CONSUMING) return -1;
    amqp_basic_cancel_t m = {amqp_cstring_bytes(c->consumer_tag), 0};
    if (method(b, c, AMQP_BASIC_CANCEL_METHOD, &m)) return -1;
    c->phase = C_CANCELLING;
    return 0;
}

int wr_broker_close(wr_broker *b, double timeout) {
    if (!wr_broker_connected(b)) return -1;
    flush_all(b);
    /* connection.close closes every channel with it. */
    b->phase = B_CLOSING;
    if (wr_wire_close(b->wire, timeout)) {
        b->phase = B_DOWN;
        return -1;
    }
    wr_publisher_abort(b->publisher);
    return 0;
}

void wr_broker_abort(wr_broker *b) {
    flush_all(b);
    wr_wire_abort(b->wire);
    wr_publisher_abort(b->publisher);
    end_channels(b);
    b->phase = B_DOWN;
    b->attempt = false;
}

void wr_broker_keepalive(wr_broker *b) {
    wr_wire_keepalive(b->wire);
    wr_publisher_keepalive(b->publisher);
}

void wr_broker_free(wr_broker *b) {
    if (!b) return;
    if (b->wire) wr_broker_abort(b);
    wr_wire_free(b->wire);
    wr_publisher_free(b->publisher);
    for (size_t i = 0; i < b->nchans; i++) {
        wr_assembler_free(&b->chans[i].assembler);
        wr_ledger_free(&b->chans[i].ledger);
    }
    free(b->chans);
    free(b->singles);
    free(b);
}
