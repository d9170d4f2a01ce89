#include "warren/retry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

long wr_retry_count(const wr_delivery *d) {
    const amqp_field_value_t *v = wr_delivery_header(d, WR_RETRIES_HEADER);
    if (!v) return 0;
    switch (v->kind) {
    case AMQP_FIELD_KIND_I64:
        return (long)v->value.i64;
    case AMQP_FIELD_KIND_I32:
        return v->value.i32;
    case AMQP_FIELD_KIND_U32:
        return (long)v->value.u32;
    case AMQP_FIELD_KIND_I16:
        return v->value.i16;
    case AMQP_FIELD_KIND_U8:
        return v->value.u8;
    default:
        return 0;
    }
}

int wr_retry_copy(wr_message *m, const wr_delivery *d, const char *queue, const char *delay_queue,
                  long delay_ms, long retries, amqp_pool_t *pool) {
    *m = (wr_message){.body = d->body,
                      .props = d->props,
                      .mandatory = true,
                      .delay_queue = delay_queue,
                      .delay_ms = delay_ms,
                      .delay_target = queue};
    const amqp_table_t *old = &d->props.headers;
    int nold = (d->props._flags & AMQP_BASIC_HEADERS_FLAG) ? old->num_entries : 0;
    amqp_table_entry_t *entries = amqp_pool_alloc(pool, (size_t)(nold + 1) * sizeof *entries);
    if (!entries) return -1;
    int n = 0;
    for (int i = 0; i < nold; i++) {
        /* The retries header is set anew; a quorum queue's delivery count
         * was the original's, and the copy is a new message. */
        amqp_bytes_t k = old->entries[i].key;
        if ((k.len == strlen(WR_RETRIES_HEADER) && !memcmp(k.bytes, WR_RETRIES_HEADER, k.len)) ||
            (k.len == strlen("x-delivery-count") && !memcmp(k.bytes, "x-delivery-count", k.len)))
            continue;
        entries[n++] = old->entries[i];
    }
    entries[n].key = amqp_cstring_bytes(WR_RETRIES_HEADER);
    entries[n].value.kind = AMQP_FIELD_KIND_I64;
    entries[n].value.value.i64 = retries + 1;
    m->props.headers = (amqp_table_t){n + 1, entries};
    m->props._flags |= AMQP_BASIC_HEADERS_FLAG;
    if (!(m->props._flags & AMQP_BASIC_DELIVERY_MODE_FLAG)) {
        m->props.delivery_mode = 2;
        m->props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    }
    if (!(m->props._flags & AMQP_BASIC_MESSAGE_ID_FLAG)) {
        static unsigned long long counter;
        char id[64];
        int len = snprintf(id, sizeof id, "warren-%d-r%llu", (int)getpid(), ++counter);
        void *bytes = amqp_pool_alloc(pool, (size_t)len);
        if (!bytes) return -1;
        memcpy(bytes, id, (size_t)len);
        m->props.message_id = (amqp_bytes_t){(size_t)len, bytes};
        m->props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
    }
    return 0;
}

/* A delivery whose copy waits for the broker's confirm. */
typedef struct pending {
    wr_retrier *r;
    wr_delivery *d;
    uint64_t id; /* the publisher's handle */
    struct pending *prev, *next;
} pending;

struct wr_retrier {
    wr_publisher *pub;
    wr_retried_fn done;
    void *ud;
    pending *head;
    size_t npending;
};

wr_retrier *wr_retrier_new(wr_publisher *pub, wr_retried_fn done, void *ud) {
    wr_retrier *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->pub = pub;
    r->done = done;
    r->ud = ud;
    return r;
}

void wr_retrier_free(wr_retrier *r) {
    free(r);
}

size_t wr_retrier_pending(const wr_retrier *r) {
    return r->npending;
}

/* Unlinks p, frees it and hands its delivery back through done. */
static void complete(pending *p, const char *err) {
    wr_retrier *r = p->r;
    if (p->prev)
        p->prev->next = p->next;
    else
        r->head = p->next;
    if (p->next) p->next->prev = p->prev;
    r->npending--;
    wr_delivery *d = p->d;
    free(p);
    r->done(r->ud, d, err);
}

static void confirmed(void *ctx, const char *err) {
    complete(ctx, err);
}

/* The one use of the publisher: the copy, its delay queue declared first
 * where needed, with a confirm callback. Returns the publish's id, or 0
 * with a message in err. */
static uint64_t publish_copy(wr_publisher *pub, const char *queue, const wr_delivery *d,
                             long delay_ms, wr_confirm_fn cb, void *ctx, char *copy_id,
                             size_t idlen, char *err, size_t errlen) {
    char delay_queue[300];
    snprintf(delay_queue, sizeof delay_queue, "%s.retry.%ld", queue, delay_ms);
    amqp_pool_t pool;
    init_amqp_pool(&pool, 1024);
    wr_message m;
    uint64_t id = 0;
    if (wr_retry_copy(&m, d, queue, delay_queue, delay_ms, wr_retry_count(d), &pool)) {
        snprintf(err, errlen, "out of memory");
    } else {
        snprintf(copy_id, idlen, "%.*s", (int)m.props.message_id.len,
                 (const char *)m.props.message_id.bytes);
        id = wr_publisher_send(pub, &m, cb, ctx, err, errlen);
    }
    empty_amqp_pool(&pool); /* the publisher keeps a copy */
    return id;
}

int wr_retrier_send(wr_retrier *r, wr_delivery *d, long delay_ms, char *copy_id, size_t idlen,
                    char *err, size_t errlen) {
    pending *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    p->id = publish_copy(r->pub, d->queue, d, delay_ms, confirmed, p, copy_id, idlen, err, errlen);
    if (!p->id) {
        free(p);
        return -1;
    }
    p->r = r;
    p->d = d;
    p->next = r->head;
    if (r->head) r->head->prev = p;
    r->head = p;
    r->npending++;
    return 0;
}

void wr_retrier_abandon(wr_retrier *r) {
    while (r->head) {
        wr_publisher_forget(r->pub, r->head->id);
        complete(r->head, "abandoned: the worker stopped waiting for the broker's confirm");
    }
}
