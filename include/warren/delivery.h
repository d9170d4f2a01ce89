/* Assembles the method, header and body frames of a basic.deliver into one
 * delivery that owns its bytes, so nothing points into rabbitmq-c's buffers
 * once amqp_maybe_release_buffers recycles them. Pure: no I/O. */
#ifndef WARREN_DELIVERY_H
#define WARREN_DELIVERY_H

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "warren/log.h"

typedef struct wr_delivery {
    uint64_t tag;
    bool redelivered;
    amqp_bytes_t exchange;
    amqp_bytes_t routing_key;
    amqp_basic_properties_t props; /* strings and headers live in pool */
    amqp_bytes_t body;
    uint64_t received; /* body bytes so far */
    amqp_pool_t pool;
    struct wr_delivery *next_free;
    /* The channel opening the tag belongs to: a tag dies with its channel
     * (see wr_broker_settle). */
    unsigned epoch;
    /* The queue it came from: its place in the configuration (the broker
     * consumes each on a channel of its own) and its name; set by whoever
     * made the delivery, NULL when not known. */
    size_t qi;
    const char *queue;
} wr_delivery;

typedef struct wr_assembler {
    wr_delivery *cur;  /* being assembled, or NULL */
    wr_delivery *free; /* recycled deliveries, kept to avoid per-message malloc */
    size_t nfree;
    size_t keep; /* most deliveries kept on the free list */
} wr_assembler;

enum {
    WR_FRAME_IGNORED = 0, /* not part of a delivery: the caller handles it */
    WR_FRAME_PART = 1,    /* consumed, the delivery is not complete yet */
    WR_FRAME_DONE = 2,    /* a delivery is complete and handed over in *out */
    WR_FRAME_ERROR = -1,  /* frames out of order (a protocol error), or out of memory */
};

/* Prepares an assembler that keeps up to keep recycled deliveries. */
void wr_assembler_init(wr_assembler *a, size_t keep);

/* Feeds one frame of the consuming channel. Returns one of WR_FRAME_*. On
 * WR_FRAME_DONE the caller owns *out until wr_delivery_release. On
 * WR_FRAME_ERROR the partial delivery is dropped. */
int wr_assembler_feed(wr_assembler *a, const amqp_frame_t *f, wr_delivery **out);

/* Drops a partly assembled delivery (the connection it came on is gone). */
void wr_assembler_reset(wr_assembler *a);

/* Returns a delivery's memory to the assembler for reuse. */
void wr_delivery_release(wr_assembler *a, wr_delivery *d);

/* Frees everything, including the free list. */
void wr_assembler_free(wr_assembler *a);

/* Makes b a copy in pool of the bytes it points to (NULL when empty).
 * Returns 0, or -1 when out of memory. */
int wr_bytes_copy(amqp_pool_t *pool, amqp_bytes_t *b);

/* Deep-copies src into dst, strings and headers in pool. Only the fields
 * whose flag is set are copied: rabbitmq-c leaves the others uninitialised.
 * Returns 0, or -1 when out of memory. */
int wr_props_copy(amqp_basic_properties_t *dst, const amqp_basic_properties_t *src,
                  amqp_pool_t *pool);

/* Finds a header by name; returns NULL when absent. */
const amqp_field_value_t *wr_delivery_header(const wr_delivery *d, const char *name);

/* The log fields of a job on d (log.h). */
wr_log_job wr_delivery_log_fields(const wr_delivery *d, unsigned version);

#endif
