#include "warren/publisher.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/log.h"

#define CHANNEL 2
#define MAX_DELAY_QUEUES 64

typedef struct pending {
    uint64_t seq;
    wr_confirm_fn cb;
    void *ctx;
    amqp_bytes_t message_id; /* owned copy, to match a basic.return */
    char *returned;          /* why the broker returned it, or NULL */
    struct pending *next;
} pending;

struct wr_publisher {
    amqp_connection_state_t conn;
    bool open;         /* channel open and in confirm mode */
    uint64_t next_seq; /* sequence number of the next publish */
    pending *head, *tail;
    /* A basic.return is followed by its content: the header names the
     * message, the body is skipped. */
    char *return_text;
    uint64_t return_body_left;
    bool in_return;
    char *delays[MAX_DELAY_QUEUES]; /* delay queues declared on this connection */
    size_t ndelays;
};

wr_publisher *wr_publisher_new(void) {
    return calloc(1, sizeof(wr_publisher));
}

static void free_pending(pending *e) {
    amqp_bytes_free(e->message_id);
    free(e->returned);
    free(e);
}

static void reset(wr_publisher *p) {
    while (p->head) {
        pending *e = p->head;
        p->head = e->next;
        free_pending(e);
    }
    p->tail = NULL;
    free(p->return_text);
    p->return_text = NULL;
    p->in_return = false;
    p->return_body_left = 0;
    for (size_t i = 0; i < p->ndelays; i++)
        free(p->delays[i]);
    p->ndelays = 0;
    p->open = false;
}

void wr_publisher_free(wr_publisher *p) {
    if (!p) return;
    reset(p);
    free(p);
}

void wr_publisher_bind(wr_publisher *p, amqp_connection_state_t conn) {
    reset(p);
    p->conn = conn;
}

/* Completes every pending publish up to seq (or only seq), oldest first.
 * They are unlinked before any callback runs, since a callback resumes a
 * job that may publish again. */
static void settle(wr_publisher *p, uint64_t seq, bool multiple, const char *err) {
    pending *done = NULL, **done_tail = &done;
    pending **link = &p->head, *prev = NULL;
    while (*link && (*link)->seq <= seq) {
        pending *e = *link;
        if (!multiple && e->seq != seq) {
            prev = e;
            link = &e->next;
            continue;
        }
        *link = e->next;
        if (p->tail == e) p->tail = prev;
        e->next = NULL;
        *done_tail = e;
        done_tail = &e->next;
    }
    while (done) {
        pending *e = done;
        done = e->next;
        char text[300];
        const char *why = err;
        if (!why && e->returned) {
            snprintf(text, sizeof text, "returned by the broker: %s", e->returned);
            why = text;
        }
        e->cb(e->ctx, why);
        free_pending(e);
    }
}

/* The channel closed with an error: every pending publish fails with it. */
static void fail_all(wr_publisher *p, const char *why) {
    p->open = false;
    settle(p, UINT64_MAX, true, why);
}

static void note_return(wr_publisher *p, const amqp_basic_properties_t *props) {
    if (!(props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)) return;
    amqp_bytes_t id = props->message_id;
    for (pending *e = p->head; e; e = e->next) {
        if (!e->returned && e->message_id.len == id.len &&
            memcmp(e->message_id.bytes, id.bytes, id.len) == 0) {
            e->returned = p->return_text;
            p->return_text = NULL;
            return;
        }
    }
}

int wr_publisher_frame(wr_publisher *p, const amqp_frame_t *f) {
    if (f->frame_type == AMQP_FRAME_HEADER && p->in_return) {
        note_return(p, f->payload.properties.decoded);
        p->return_body_left = f->payload.properties.body_size;
        p->in_return = p->return_body_left > 0;
        return 0;
    }
    if (f->frame_type == AMQP_FRAME_BODY && p->in_return) {
        uint64_t n = f->payload.body_fragment.len;
        p->return_body_left -= n < p->return_body_left ? n : p->return_body_left;
        p->in_return = p->return_body_left > 0;
        return 0;
    }
    if (f->frame_type != AMQP_FRAME_METHOD) return 0;
    switch (f->payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *m = f->payload.method.decoded;
        settle(p, m->delivery_tag, m->multiple, NULL);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *m = f->payload.method.decoded;
        settle(p, m->delivery_tag, m->multiple, "rejected by the broker (nack)");
        break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        const amqp_basic_return_t *m = f->payload.method.decoded;
        char text[256];
        snprintf(text, sizeof text, "%u %.*s", m->reply_code, (int)m->reply_text.len,
                 (char *)m->reply_text.bytes);
        free(p->return_text);
        p->return_text = strdup(text);
        p->in_return = true;
        break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *m = f->payload.method.decoded;
        char why[300];
        snprintf(why, sizeof why, "channel closed by the broker: %.*s", (int)m->reply_text.len,
                 (char *)m->reply_text.bytes);
        amqp_channel_close_ok_t ok = {0};
        int rc = amqp_send_method(p->conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        wr_warn("publishing %s", why);
        fail_all(p, why);
        return rc == AMQP_STATUS_OK ? 0 : -1;
    }
    default:
        break;
    }
    return 0;
}

/* Reads the reply of a synchronous call on the channel into err. */
static int check(wr_publisher *p, const char *what, char *err, size_t errlen) {
    amqp_rpc_reply_t r = amqp_get_rpc_reply(p->conn);
    if (r.reply_type == AMQP_RESPONSE_NORMAL) return 0;
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        const amqp_channel_close_t *m = r.reply.decoded;
        snprintf(err, errlen, "%s: %.*s", what, (int)m->reply_text.len,
                 (char *)m->reply_text.bytes);
        amqp_channel_close_ok_t ok = {0};
        amqp_send_method(p->conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        fail_all(p, err);
    } else {
        snprintf(err, errlen, "%s: %s", what,
                 r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
                     ? amqp_error_string2(r.library_error)
                     : "the connection failed");
    }
    return -1;
}

static int ensure_open(wr_publisher *p, char *err, size_t errlen) {
    if (!p->conn) {
        snprintf(err, errlen, "not connected to the broker");
        return -1;
    }
    if (p->open) return 0;
    amqp_channel_open(p->conn, CHANNEL);
    if (check(p, "opening the publishing channel", err, errlen)) return -1;
    amqp_confirm_select(p->conn, CHANNEL);
    if (check(p, "enabling publisher confirms", err, errlen)) return -1;
    p->open = true;
    p->next_seq = 1;
    return 0;
}

uint64_t wr_publisher_send(wr_publisher *p, const wr_message *m, wr_confirm_fn cb, void *ctx,
                           char *err, size_t errlen) {
    if (ensure_open(p, err, errlen)) return 0;
    pending *e = calloc(1, sizeof *e);
    if (!e || !(e->message_id = amqp_bytes_malloc_dup(m->props.message_id)).bytes) {
        free(e);
        snprintf(err, errlen, "out of memory");
        return 0;
    }
    int rc = amqp_basic_publish(p->conn, CHANNEL, m->exchange, m->routing_key, m->mandatory, 0,
                                &m->props, m->body);
    if (rc != AMQP_STATUS_OK) {
        free_pending(e);
        snprintf(err, errlen, "publishing: %s", amqp_error_string2(rc));
        return 0;
    }
    e->seq = p->next_seq++;
    e->cb = cb;
    e->ctx = ctx;
    if (p->tail)
        p->tail->next = e;
    else
        p->head = e;
    p->tail = e;
    return e->seq;
}

void wr_publisher_forget(wr_publisher *p, uint64_t seq) {
    pending **link = &p->head, *prev = NULL;
    for (; *link; prev = *link, link = &(*link)->next) {
        if ((*link)->seq != seq) continue;
        pending *e = *link;
        *link = e->next;
        if (p->tail == e) p->tail = prev;
        free_pending(e);
        return;
    }
}

int wr_publisher_delay_queue(wr_publisher *p, const char *name, long ttl_ms, const char *target,
                             char *err, size_t errlen) {
    for (size_t i = 0; i < p->ndelays; i++)
        if (!strcmp(p->delays[i], name)) return 0;
    if (ensure_open(p, err, errlen)) return -1;
    amqp_table_entry_t args[3];
    args[0].key = amqp_cstring_bytes("x-message-ttl");
    args[0].value.kind = AMQP_FIELD_KIND_I64;
    args[0].value.value.i64 = ttl_ms;
    args[1].key = amqp_cstring_bytes("x-dead-letter-exchange");
    args[1].value.kind = AMQP_FIELD_KIND_UTF8;
    args[1].value.value.bytes = amqp_cstring_bytes("");
    args[2].key = amqp_cstring_bytes("x-dead-letter-routing-key");
    args[2].value.kind = AMQP_FIELD_KIND_UTF8;
    args[2].value.value.bytes = amqp_cstring_bytes(target);
    amqp_table_t table = {3, args};
    amqp_queue_declare(p->conn, CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, table);
    char what[300];
    snprintf(what, sizeof what, "declaring delay queue '%s'", name);
    if (check(p, what, err, errlen)) return -1;
    if (p->ndelays < MAX_DELAY_QUEUES) p->delays[p->ndelays++] = strdup(name);
    return 0;
}
