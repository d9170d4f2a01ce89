#include "warren/delivery.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* Exported by librabbitmq 0.11 but not declared in its public header. */
int amqp_table_clone(const amqp_table_t *original, amqp_table_t *clone, amqp_pool_t *pool);

/* Every delivery in flight holds at least one page, and a recycled delivery
 * keeps its pages, so the page is sized for the usual work message (exchange,
 * routing key, a few properties, a short body) rather than for the worst
 * case: ten thousand sleeping jobs must not pin forty megabytes of mostly
 * empty 4 KB pages. Headers and longer strings simply take another page. */
#define POOL_PAGE 256
/* A body longer than this gets its own malloc instead of a pool block: the
 * pool would calloc it, zeroing bytes that are overwritten at once, and would
 * allocate a block list beside it. Derived from body.len alone, so that
 * release knows which bodies to free without a flag in the struct. */
#define POOL_BODY_MAX 128

void wr_assembler_init(wr_assembler *a, size_t keep) {
    memset(a, 0, sizeof *a);
    a->keep = keep;
}

static bool body_on_heap(const wr_delivery *d) {
    return d->body.bytes && d->body.len > POOL_BODY_MAX;
}

static wr_delivery *take(wr_assembler *a) {
    wr_delivery *d = a->free;
    if (d) {
        a->free = d->next_free;
        a->nfree--;
        amqp_pool_t pool = d->pool;
        memset(d, 0, sizeof *d);
        d->pool = pool;
        return d;
    }
    d = calloc(1, sizeof *d);
    if (d) init_amqp_pool(&d->pool, POOL_PAGE);
    return d;
}

void wr_delivery_release(wr_assembler *a, wr_delivery *d) {
    if (!d) return;
    if (body_on_heap(d)) free(d->body.bytes);
    d->body.bytes = NULL;
    if (a->nfree >= a->keep) {
        empty_amqp_pool(&d->pool);
        free(d);
        return;
    }
    recycle_amqp_pool(&d->pool);
    d->next_free = a->free;
    a->free = d;
    a->nfree++;
}

int wr_bytes_copy(amqp_pool_t *pool, amqp_bytes_t *b) {
    if (b->len == 0) {
        b->bytes = NULL;
        return 0;
    }
    void *copy = amqp_pool_alloc(pool, b->len);
    if (!copy) return -1;
    memcpy(copy, b->bytes, b->len);
    b->bytes = copy;
    return 0;
}

int wr_props_copy(amqp_basic_properties_t *p, const amqp_basic_properties_t *src,
                  amqp_pool_t *pool) {
    memset(p, 0, sizeof *p);
    p->_flags = src->_flags;
    static const struct {
        amqp_flags_t flag;
        size_t offset;
    } strings[] = {
        {AMQP_BASIC_CONTENT_TYPE_FLAG, offsetof(amqp_basic_properties_t, content_type)},
        {AMQP_BASIC_CONTENT_ENCODING_FLAG, offsetof(amqp_basic_properties_t, content_encoding)},
        {AMQP_BASIC_CORRELATION_ID_FLAG, offsetof(amqp_basic_properties_t, correlation_id)},
        {AMQP_BASIC_REPLY_TO_FLAG, offsetof(amqp_basic_properties_t, reply_to)},
        {AMQP_BASIC_EXPIRATION_FLAG, offsetof(amqp_basic_properties_t, expiration)},
        {AMQP_BASIC_MESSAGE_ID_FLAG, offsetof(amqp_basic_properties_t, message_id)},
        {AMQP_BASIC_TYPE_FLAG, offsetof(amqp_basic_properties_t, type)},
        {AMQP_BASIC_USER_ID_FLAG, offsetof(amqp_basic_properties_t, user_id)},
        {AMQP_BASIC_APP_ID_FLAG, offsetof(amqp_basic_properties_t, app_id)},
        {AMQP_BASIC_CLUSTER_ID_FLAG, offsetof(amqp_basic_properties_t, cluster_id)},
    };
    for (size_t i = 0; i < sizeof strings / sizeof *strings; i++) {
        if (!(src->_flags & strings[i].flag)) continue;
        amqp_bytes_t *to = (amqp_bytes_t *)((char *)p + strings[i].offset);
        *to = *(const amqp_bytes_t *)((const char *)src + strings[i].offset);
        if (wr_bytes_copy(pool, to)) return -1;
    }
    if (src->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) p->delivery_mode = src->delivery_mode;
    if (src->_flags & AMQP_BASIC_PRIORITY_FLAG) p->priority = src->priority;
    if (src->_flags & AMQP_BASIC_TIMESTAMP_FLAG) p->timestamp = src->timestamp;
    if ((src->_flags & AMQP_BASIC_HEADERS_FLAG) &&
        amqp_table_clone(&src->headers, &p->headers, pool) != AMQP_STATUS_OK)
        return -1;
    return 0;
}

static int drop(wr_assembler *a) {
    wr_delivery_release(a, a->cur);
    a->cur = NULL;
    return WR_FRAME_ERROR;
}

static int finish(wr_assembler *a, wr_delivery **out) {
    *out = a->cur;
    a->cur = NULL;
    return WR_FRAME_DONE;
}

int wr_assembler_feed(wr_assembler *a, const amqp_frame_t *f, wr_delivery **out) {
    *out = NULL;
    switch (f->frame_type) {
    case AMQP_FRAME_METHOD: {
        /* A method in the middle of a delivery's content breaks the protocol. */
        if (a->cur) return drop(a);
        if (f->payload.method.id != AMQP_BASIC_DELIVER_METHOD) return WR_FRAME_IGNORED;
        const amqp_basic_deliver_t *m = f->payload.method.decoded;
        wr_delivery *d = take(a);
        if (!d) return WR_FRAME_ERROR;
        a->cur = d;
        d->tag = m->delivery_tag;
        d->redelivered = m->redelivered;
        d->exchange = m->exchange;
        d->routing_key = m->routing_key;
        if (wr_bytes_copy(&d->pool, &d->exchange) || wr_bytes_copy(&d->pool, &d->routing_key))
            return drop(a);
        return WR_FRAME_PART;
    }
    case AMQP_FRAME_HEADER: {
        if (!a->cur || a->cur->body.bytes) return drop(a);
        wr_delivery *d = a->cur;
        const amqp_basic_properties_t *props = f->payload.properties.decoded;
        if (wr_props_copy(&d->props, props, &d->pool)) return drop(a);
        uint64_t size = f->payload.properties.body_size;
        if (size > SIZE_MAX - 1) return drop(a);
        /* One byte more so that an empty body still has a buffer: a non-NULL
         * body.bytes is what marks the header as seen. */
        void *bytes = size > POOL_BODY_MAX ? malloc((size_t)size + 1)
                                           : amqp_pool_alloc(&d->pool, (size_t)size + 1);
        if (!bytes) return drop(a);
        d->body.len = (size_t)size;
        d->body.bytes = bytes;
        return size == 0 ? finish(a, out) : WR_FRAME_PART;
    }
    case AMQP_FRAME_BODY: {
        wr_delivery *d = a->cur;
        if (!d || !d->body.bytes) return drop(a);
        amqp_bytes_t frag = f->payload.body_fragment;
        if (frag.len > d->body.len - d->received) return drop(a);
        memcpy((char *)d->body.bytes + d->received, frag.bytes, frag.len);
        d->received += frag.len;
        return d->received == d->body.len ? finish(a, out) : WR_FRAME_PART;
    }
    default:
        return WR_FRAME_IGNORED;
    }
}

void wr_assembler_reset(wr_assembler *a) {
    wr_delivery_release(a, a->cur);
    a->cur = NULL;
}

void wr_assembler_free(wr_assembler *a) {
    wr_assembler_reset(a);
    while (a->free) {
        wr_delivery *d = a->free;
        a->free = d->next_free;
        empty_amqp_pool(&d->pool);
        free(d);
    }
    a->nfree = 0;
}

const amqp_field_value_t *wr_delivery_header(const wr_delivery *d, const char *name) {
    size_t n = strlen(name);
    const amqp_table_t *t = &d->props.headers;
    for (int i = 0; i < t->num_entries; i++) {
        const amqp_bytes_t k = t->entries[i].key;
        if (k.len == n && memcmp(k.bytes, name, n) == 0) return &t->entries[i].value;
    }
    return NULL;
}

wr_log_job wr_delivery_log_fields(const wr_delivery *d, unsigned version) {
    return (wr_log_job){.queue = d->queue,
                        .id = d->props.message_id.bytes,
                        .idlen = d->props.message_id.len,
                        .tag = (unsigned long long)d->tag,
                        .version = version};
}
