#include "warren/publisher.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/delivery.h"
#include "warren/log.h"
#include "warren/wire.h"

#define PUBLISH 1 /* channel: publishes in confirm mode */
#define PROBE 2   /* channel: checks and declares before publishing */
#define CONNECT_SECONDS 5.0

/* Something publishes need first: an exchange that exists, or a declared
 * delay queue. Known for the life of one connection. */
typedef struct need {
    bool queue; /* a delay queue to declare, else an exchange to check */
    char *name;
    long ttl_ms;
    char *target;
    enum { NEED_NEW, NEED_ASKED, NEED_MET } state;
    struct need *next;
} need;

typedef struct msg {
    uint64_t id;  /* the caller's handle */
    uint64_t seq; /* the channel's sequence number once written, else 0 */
    wr_confirm_fn cb;
    void *ctx; /* cb is NULL once forgotten */
    amqp_pool_t pool;
    amqp_bytes_t exchange, routing_key;
    amqp_bytes_t body; /* an owned copy, only while it waits to be written */
    size_t body_len;   /* a return is matched by length and hash, not a copy */
    uint64_t body_hash;
    amqp_basic_properties_t props;
    bool mandatory;
    bool borrowed; /* the wire may still hold the caller's body bytes */
    need *need;
    char *returned; /* why the broker returned it */
    struct msg *next;
} msg;

typedef enum { P_DOWN, P_CONNECTING, P_OPENING, P_SELECTING, P_READY } pub_state;

struct wr_publisher {
    struct ev_loop *loop;
    wr_wire *wire;
    pub_state state;
    bool probe_open, probe_busy;
    char *url, *user;
    int heartbeat;
    uint64_t next_id, next_seq;
    msg *queued, *queued_tail; /* not written yet */
    /* Written, waiting for the confirm: ring[seq & (ring_cap - 1)], for
     * every seq from ring_base to next_seq (NULL once confirmed). */
    msg **ring;
    size_t ring_cap; /* a power of two, or 0 */
    uint64_t ring_base;
    size_t ninflight;
    need *needs;
    /* A basic.return and its content, matched once the body is complete. */
    bool in_return;
    char return_text[256];
    amqp_bytes_t ret_exchange, ret_key, ret_id;
    bool ret_has_id;
    size_t ret_len, ret_got;
    uint64_t ret_hash;
};

/* FNV-1a, continued from h over n more bytes. */
static uint64_t hash(uint64_t h, const void *bytes, size_t n) {
    const unsigned char *b = bytes;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}
#define HASH_START 0xcbf29ce484222325ull

static void wire_ready(void *ud);
static void wire_frame(void *ud, const amqp_frame_t *f);
static void wire_closed(void *ud, wr_broker_status st, const char *why);

wr_publisher *wr_publisher_new(struct ev_loop *loop) {
    wr_publisher *p = calloc(1, sizeof *p);
    static const wr_wire_events wev = {wire_ready, wire_frame, wire_closed};
    if (!p || !(p->wire = wr_wire_new(loop, &wev, p))) {
        free(p);
        return NULL;
    }
    p->loop = loop;
    return p;
}

static void free_msg(msg *m) {
    empty_amqp_pool(&m->pool);
    free(m->body.bytes);
    free(m->returned);
    free(m);
}

static void free_needs(wr_publisher *p) {
    while (p->needs) {
        need *n = p->needs;
        p->needs = n->next;
        free(n->name);
        free(n->target);
        free(n);
    }
}

static void clear_return(wr_publisher *p) {
    amqp_bytes_free(p->ret_exchange);
    amqp_bytes_free(p->ret_key);
    amqp_bytes_free(p->ret_id);
    p->ret_exchange = p->ret_key = p->ret_id = amqp_empty_bytes;
    p->in_return = false;
    p->ret_len = p->ret_got = 0;
}

/* Completes the messages of list (unlinked already), oldest first: a
 * callback resumes a job that may publish again, or free the body it
 * lent, so the wire lets go of it first. */
static void complete(wr_publisher *p, msg *list, const char *err) {
    while (list) {
        msg *m = list;
        list = m->next;
        if (m->borrowed) wr_wire_detach(p->wire, m);
        char text[300];
        const char *why = err;
        if (!why && m->returned) {
            snprintf(text, sizeof text, "returned by the broker: %s", m->returned);
            why = text;
        }
        if (m->cb) m->cb(m->ctx, why);
        free_msg(m);
    }
}

static msg **slot(const wr_publisher *p, uint64_t seq) {
    return &p->ring[seq & (p->ring_cap - 1)];
}

/* Takes every publish in flight off the ring, in order, as a list. */
static msg *take_inflight(wr_publisher *p) {
    msg *list = NULL, **tail = &list;
    for (uint64_t seq = p->ring_base; p->ninflight > 0 && seq <= p->next_seq; seq++) {
        msg *m = *slot(p, seq);
        if (!m) continue;
        *slot(p, seq) = NULL;
        p->ninflight--;
        m->next = NULL;
        *tail = m;
        tail = &m->next;
    }
    p->ninflight = 0;
    return list;
}

/* The connection is over: every publish fails with why (none when
 * silent, for an abort). */
static void fail_all(wr_publisher *p, const char *why, bool silent) {
    msg *list = take_inflight(p), **end = &list;
    while (*end)
        end = &(*end)->next;
    *end = p->queued;
    p->queued = p->queued_tail = NULL;
    free_needs(p);
    clear_return(p);
    p->state = P_DOWN;
    p->probe_open = p->probe_busy = false;
    if (silent)
        for (msg *m = list; m; m = m->next)
            m->cb = NULL;
    complete(p, list, why);
}

void wr_publisher_abort(wr_publisher *p) {
    wr_wire_abort(p->wire);
    fail_all(p, NULL, true);
}

void wr_publisher_free(wr_publisher *p) {
    if (!p) return;
    wr_publisher_abort(p);
    wr_wire_free(p->wire);
    free(p->ring);
    free(p->url);
    free(p->user);
    free(p);
}

void wr_publisher_keepalive(wr_publisher *p) {
    wr_wire_keepalive(p->wire);
}

void wr_publisher_target(wr_publisher *p, const char *url, int heartbeat) {
    if (p->url && !strcmp(p->url, url)) return;
    if (p->state != P_DOWN) {
        wr_wire_abort(p->wire);
        fail_all(p, "the consumer moved to another broker node", false);
    }
    free(p->url);
    free(p->user);
    p->url = strdup(url);
    p->user = NULL;
    p->heartbeat = heartbeat;
    char *copy = strdup(url);
    struct amqp_connection_info info;
    if (copy && amqp_parse_url(copy, &info) == AMQP_STATUS_OK) p->user = strdup(info.user);
    free(copy);
}

static need *find_need(wr_publisher *p, bool queue, const char *name) {
    for (need *n = p->needs; n; n = n->next)
        if (n->queue == queue && !strcmp(n->name, name)) return n;
    need *n = calloc(1, sizeof *n);
    if (!n || !(n->name = strdup(name))) {
        free(n);
        return NULL;
    }
    n->queue = queue;
    n->next = p->needs;
    p->needs = n;
    return n;
}

/* Asks channel 2 about the first need not asked yet; one at a time. */
static void ask(wr_publisher *p) {
    if (!p->probe_open || p->probe_busy) return;
    for (need *n = p->needs; n; n = n->next) {
        if (n->state != NEED_NEW) continue;
        n->state = NEED_ASKED;
        p->probe_busy = true;
        if (!n->queue) {
            amqp_exchange_declare_t m = {.exchange = amqp_cstring_bytes(n->name),
                                         .passive = 1,
                                         .arguments = amqp_empty_table};
            wr_wire_method(p->wire, PROBE, AMQP_EXCHANGE_DECLARE_METHOD, &m);
            return;
        }
        amqp_table_entry_t args[3];
        args[0].key = amqp_cstring_bytes("x-message-ttl");
        args[0].value.kind = AMQP_FIELD_KIND_I64;
        args[0].value.value.i64 = n->ttl_ms;
        args[1].key = amqp_cstring_bytes("x-dead-letter-exchange");
        args[1].value.kind = AMQP_FIELD_KIND_UTF8;
        args[1].value.value.bytes = amqp_cstring_bytes("");
        args[2].key = amqp_cstring_bytes("x-dead-letter-routing-key");
        args[2].value.kind = AMQP_FIELD_KIND_UTF8;
        args[2].value.value.bytes = amqp_cstring_bytes(n->target);
        amqp_queue_declare_t m = {
            .queue = amqp_cstring_bytes(n->name), .durable = 1, .arguments = {3, args}};
        wr_wire_method(p->wire, PROBE, AMQP_QUEUE_DECLARE_METHOD, &m);
        return;
    }
}

/* Hands m, with body, to the wire: a copy, or with borrow the caller's
 * bytes, which stay valid while the caller waits for the callback (see
 * complete and wr_publisher_forget). Returns 0, or -1 when the connection
 * cannot take it now. */
static int write_msg(wr_publisher *p, msg *m, amqp_bytes_t body, bool borrow) {
    amqp_basic_publish_t pm = {
        .exchange = m->exchange, .routing_key = m->routing_key, .mandatory = m->mandatory};
    m->borrowed = borrow && body.len >= WR_WIRE_BORROW_MIN;
    return wr_wire_publish(p->wire, PUBLISH, &pm, &m->props, body, m->borrowed ? m : NULL);
}

/* Makes room on the ring for one more publish in flight, before it is
 * written. Returns 0, or -1 when out of memory. */
static int reserve(wr_publisher *p) {
    if (p->ninflight == 0) p->ring_base = p->next_seq + 1;
    if (p->next_seq + 1 - p->ring_base < p->ring_cap) return 0;
    size_t cap = p->ring_cap ? p->ring_cap * 2 : 64;
    msg **ring = calloc(cap, sizeof *ring);
    if (!ring) return -1;
    for (uint64_t seq = p->ring_base; p->ring_cap && seq <= p->next_seq; seq++)
        ring[seq & (cap - 1)] = *slot(p, seq);
    free(p->ring);
    p->ring = ring;
    p->ring_cap = cap;
    return 0;
}

/* Puts a written m, room reserved, with the publishes waiting for their
 * confirm. */
static void in_flight(wr_publisher *p, msg *m) {
    m->seq = ++p->next_seq;
    m->next = NULL;
    *slot(p, m->seq) = m;
    p->ninflight++;
}

/* Writes every queued publish whose needs are met, in order. Never calls
 * back: a failure of the write is reported by the wire later. */
static void write_queued(wr_publisher *p) {
    if (p->state != P_READY) return;
    msg **link = &p->queued, *prev = NULL;
    while (*link) {
        msg *m = *link;
        if (m->need && m->need->state != NEED_MET) {
            prev = m;
            link = &m->next;
            continue;
        }
        if (reserve(p) || write_msg(p, m, m->body, false)) return;
        *link = m->next;
        if (p->queued_tail == m) p->queued_tail = prev;
        free(m->body.bytes);
        m->body = amqp_empty_bytes;
        in_flight(p, m);
    }
    ask(p);
}

static int connect_now(wr_publisher *p, char *err, size_t errlen) {
    p->state = P_CONNECTING;
    if (wr_wire_open(p->wire, p->url, p->heartbeat, CONNECT_SECONDS, err, errlen) == 0) return 0;
    p->state = P_DOWN;
    return -1;
}

uint64_t wr_publisher_send(wr_publisher *p, const wr_message *in, wr_confirm_fn cb, void *ctx,
                           char *err, size_t errlen) {
    if (!p->url) {
        snprintf(err, errlen, "not connected to the broker");
        return 0;
    }
    const amqp_bytes_t uid = in->props.user_id;
    if ((in->props._flags & AMQP_BASIC_USER_ID_FLAG) && p->user &&
        (uid.len != strlen(p->user) || memcmp(uid.bytes, p->user, uid.len))) {
        snprintf(err, errlen, "user_id '%.*s' is not the login name '%s' (the broker refuses it)",
                 (int)uid.len, (char *)uid.bytes, p->user);
        return 0;
    }
    msg *m = calloc(1, sizeof *m);
    if (!m) goto nomem;
    init_amqp_pool(&m->pool, 1024);
    m->exchange = in->exchange;
    m->routing_key = in->routing_key;
    m->mandatory = in->mandatory;
    if (wr_bytes_copy(&m->pool, &m->exchange) || wr_bytes_copy(&m->pool, &m->routing_key) ||
        wr_props_copy(&m->props, &in->props, &m->pool))
        goto nomem;
    m->body_len = in->body.len;
    if (m->mandatory) m->body_hash = hash(HASH_START, in->body.bytes, in->body.len);
    if (in->delay_queue) {
        m->routing_key = amqp_cstring_bytes(in->delay_queue);
        m->exchange = amqp_empty_bytes;
        if (wr_bytes_copy(&m->pool, &m->routing_key)) goto nomem;
        if (!(m->need = find_need(p, true, in->delay_queue))) goto nomem;
        if (!m->need->target) {
            m->need->ttl_ms = in->delay_ms;
            if (!(m->need->target = strdup(in->delay_target))) goto nomem;
        }
    } else if (m->exchange.len && !(m->exchange.len > 4 && !memcmp(m->exchange.bytes, "amq.", 4))) {
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)m->exchange.len, (char *)m->exchange.bytes);
        if (!(m->need = find_need(p, false, name))) goto nomem;
    }
    if (p->state == P_DOWN && connect_now(p, err, errlen)) {
        free_msg(m);
        return 0;
    }
    m->id = ++p->next_id;
    m->cb = cb;
    m->ctx = ctx;
    /* Nothing before it and nothing to wait for: straight to the wire,
     * without a copy of the body of our own. */
    if (p->state == P_READY && !p->queued && (!m->need || m->need->state == NEED_MET) &&
        reserve(p) == 0 && write_msg(p, m, in->body, true) == 0) {
        in_flight(p, m);
        return m->id;
    }
    m->body.len = in->body.len;
    if (in->body.len && !(m->body.bytes = malloc(in->body.len))) goto nomem;
    if (in->body.len) memcpy(m->body.bytes, in->body.bytes, in->body.len);
    if (p->queued_tail)
        p->queued_tail->next = m;
    else
        p->queued = m;
    p->queued_tail = m;
    write_queued(p);
    return m->id;
nomem:
    if (m) free_msg(m);
    snprintf(err, errlen, "out of memory");
    return 0;
}

void wr_publisher_forget(wr_publisher *p, uint64_t id) {
    msg **link = &p->queued, *prev = NULL;
    for (; *link; prev = *link, link = &(*link)->next) {
        if ((*link)->id != id) continue;
        msg *m = *link;
        *link = m->next;
        if (p->queued_tail == m) p->queued_tail = prev;
        free_msg(m);
        return;
    }
    /* Written already: it keeps its place for the sequence numbers, and the
     * wire lets go of the caller's bytes. */
    for (uint64_t seq = p->ring_base; p->ninflight > 0 && seq <= p->next_seq; seq++) {
        msg *m = *slot(p, seq);
        if (!m || m->id != id) continue;
        m->cb = NULL;
        if (m->borrowed) wr_wire_detach(p->wire, m);
        m->borrowed = false;
    }
}

static void wire_ready(void *ud) {
    wr_publisher *p = ud;
    p->state = P_OPENING;
    p->next_seq = 0;
    amqp_channel_open_t m = {amqp_empty_bytes};
    wr_wire_method(p->wire, PUBLISH, AMQP_CHANNEL_OPEN_METHOD, &m);
    wr_wire_method(p->wire, PROBE, AMQP_CHANNEL_OPEN_METHOD, &m);
}

static void wire_closed(void *ud, wr_broker_status st, const char *why) {
    wr_publisher *p = ud;
    (void)st;
    char text[400];
    snprintf(text, sizeof text, "publishing connection: %s", why);
    if (p->queued || p->ninflight) wr_warn("%s", text);
    fail_all(p, text, false);
}

/* Confirms every in-flight publish up to seq (or only seq), found on the
 * ring by its number. */
static void confirm(wr_publisher *p, uint64_t seq, bool multiple, const char *err) {
    msg *done = NULL, **done_tail = &done;
    if (p->ninflight > 0 && seq >= p->ring_base) {
        if (seq > p->next_seq) {
            if (!multiple)
                seq = p->ring_base - 1; /* never sent: nothing to confirm */
            else
                seq = p->next_seq;
        }
        for (uint64_t s = multiple ? p->ring_base : seq; s <= seq; s++) {
            msg *m = *slot(p, s);
            if (!m) continue;
            *slot(p, s) = NULL;
            p->ninflight--;
            m->next = NULL;
            *done_tail = m;
            done_tail = &m->next;
        }
        while (p->ninflight > 0 && !*slot(p, p->ring_base)) /* the oldest left */
            p->ring_base++;
    }
    complete(p, done, err);
}

static bool same(amqp_bytes_t a, amqp_bytes_t b) {
    return a.len == b.len && (a.len == 0 || !memcmp(a.bytes, b.bytes, a.len));
}

/* A returned message is complete: the oldest in-flight publish with the
 * same exchange, routing key, id and body (length and hash), not yet
 * returned, is it. */
static void match_return(wr_publisher *p) {
    for (uint64_t seq = p->ring_base; p->ninflight > 0 && seq <= p->next_seq; seq++) {
        msg *m = *slot(p, seq);
        if (!m) continue;
        bool has_id = m->props._flags & AMQP_BASIC_MESSAGE_ID_FLAG;
        if (m->returned || !m->mandatory || has_id != p->ret_has_id ||
            (has_id && !same(m->props.message_id, p->ret_id)) ||
            !same(m->exchange, p->ret_exchange) || !same(m->routing_key, p->ret_key) ||
            m->body_len != p->ret_len || m->body_hash != p->ret_hash)
            continue;
        m->returned = strdup(p->return_text);
        break;
    }
    clear_return(p);
}

static void returned_content(wr_publisher *p, const amqp_frame_t *f) {
    if (f->frame_type == AMQP_FRAME_HEADER) {
        const amqp_basic_properties_t *props = f->payload.properties.decoded;
        p->ret_has_id = props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG;
        if (p->ret_has_id) p->ret_id = amqp_bytes_malloc_dup(props->message_id);
        p->ret_len = (size_t)f->payload.properties.body_size;
        p->ret_hash = HASH_START;
        if (p->ret_len == 0) match_return(p);
        return;
    }
    amqp_bytes_t frag = f->payload.body_fragment;
    if (frag.len > p->ret_len - p->ret_got) {
        wr_wire_end(p->wire, AMQP_UNEXPECTED_FRAME, WR_BROKER_FAILED,
                    "protocol error from the broker: a returned message's body is too long");
        return;
    }
    p->ret_hash = hash(p->ret_hash, frag.bytes, frag.len);
    p->ret_got += frag.len;
    if (p->ret_got == p->ret_len) match_return(p);
}

static void publish_frame(wr_publisher *p, const amqp_frame_t *f) {
    if (f->frame_type != AMQP_FRAME_METHOD) {
        if (p->in_return) returned_content(p, f);
        return;
    }
    switch (f->payload.method.id) {
    case AMQP_CHANNEL_OPEN_OK_METHOD: {
        p->state = P_SELECTING;
        amqp_confirm_select_t m = {0};
        wr_wire_method(p->wire, PUBLISH, AMQP_CONFIRM_SELECT_METHOD, &m);
        return;
    }
    case AMQP_CONFIRM_SELECT_OK_METHOD:
        p->state = P_READY;
        write_queued(p);
        return;
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *m = f->payload.method.decoded;
        confirm(p, m->delivery_tag, m->multiple, NULL);
        return;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *m = f->payload.method.decoded;
        confirm(p, m->delivery_tag, m->multiple, "rejected by the broker (nack)");
        return;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        const amqp_basic_return_t *m = f->payload.method.decoded;
        clear_return(p);
        snprintf(p->return_text, sizeof p->return_text, "%u %.*s", m->reply_code,
                 (int)m->reply_text.len, (char *)m->reply_text.bytes);
        p->ret_exchange = amqp_bytes_malloc_dup(m->exchange);
        p->ret_key = amqp_bytes_malloc_dup(m->routing_key);
        p->in_return = true;
        return;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
        /* Rare now that exchanges are checked first; every publish in
         * flight on the channel fails with it. */
        const amqp_channel_close_t *m = f->payload.method.decoded;
        char why[300];
        snprintf(why, sizeof why, "channel closed by the broker: %.*s", (int)m->reply_text.len,
                 (char *)m->reply_text.bytes);
        wr_warn("publishing %s", why);
        amqp_channel_close_ok_t ok = {0};
        wr_wire_method(p->wire, PUBLISH, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        msg *list = take_inflight(p);
        clear_return(p);
        p->state = P_OPENING;
        p->next_seq = 0;
        amqp_channel_open_t open = {amqp_empty_bytes};
        wr_wire_method(p->wire, PUBLISH, AMQP_CHANNEL_OPEN_METHOD, &open);
        complete(p, list, why);
        return;
    }
    default:
        return;
    }
}

static void probe_frame(wr_publisher *p, const amqp_frame_t *f) {
    if (f->frame_type != AMQP_FRAME_METHOD) return;
    need *asked = NULL;
    for (need *n = p->needs; n; n = n->next)
        if (n->state == NEED_ASKED) asked = n;
    switch (f->payload.method.id) {
    case AMQP_CHANNEL_OPEN_OK_METHOD:
        p->probe_open = true;
        ask(p);
        return;
    case AMQP_EXCHANGE_DECLARE_OK_METHOD:
    case AMQP_QUEUE_DECLARE_OK_METHOD:
        p->probe_busy = false;
        if (asked) asked->state = NEED_MET;
        write_queued(p);
        return;
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *m = f->payload.method.decoded;
        char why[400];
        snprintf(why, sizeof why, "%s '%s': %.*s",
                 asked && asked->queue ? "declaring delay queue" : "exchange",
                 asked ? asked->name : "?", (int)m->reply_text.len, (char *)m->reply_text.bytes);
        amqp_channel_close_ok_t ok = {0};
        wr_wire_method(p->wire, PROBE, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        p->probe_open = p->probe_busy = false;
        amqp_channel_open_t open = {amqp_empty_bytes};
        wr_wire_method(p->wire, PROBE, AMQP_CHANNEL_OPEN_METHOD, &open);
        /* The publishes that needed it fail; the need is asked again next time. */
        msg *failed = NULL, **tail = &failed, **link = &p->queued, *prev = NULL;
        while (*link) {
            msg *q = *link;
            if (q->need != asked) {
                prev = q;
                link = &q->next;
                continue;
            }
            *link = q->next;
            if (p->queued_tail == q) p->queued_tail = prev;
            q->next = NULL;
            q->need = NULL;
            *tail = q;
            tail = &q->next;
        }
        if (asked) asked->state = NEED_NEW;
        complete(p, failed, why);
        return;
    }
    default:
        return;
    }
}

static void wire_frame(void *ud, const amqp_frame_t *f) {
    wr_publisher *p = ud;
    if (f->channel == 0) {
        if (f->payload.method.id == AMQP_CONNECTION_BLOCKED_METHOD) {
            const amqp_connection_blocked_t *m = f->payload.method.decoded;
            wr_warn("the broker blocked publishing (%.*s): publishes wait, acks and deliveries "
                    "go on",
                    (int)m->reason.len, (char *)m->reason.bytes);
        } else {
            wr_info("the broker unblocked publishing");
        }
        return;
    }
    if (f->channel == PUBLISH)
        publish_frame(p, f);
    else if (f->channel == PROBE)
        probe_frame(p, f);
    else
        wr_wire_end(p->wire, AMQP_UNEXPECTED_FRAME, WR_BROKER_FAILED,
                    "protocol error from the broker: a frame on a channel that is not open");
}
