/* Publishing with confirms, on a connection of its own: RabbitMQ blocks
 * only connections that publish (a memory alarm), so acks and deliveries on
 * the consuming connection go on while publishes wait. The connection is
 * opened on first use, to the node the consumer uses, and never blocks the
 * loop: a publish is queued, written when the socket takes it, and its
 * callback runs when the broker confirms, rejects or returns it.
 *
 * Channel 1 publishes in confirm mode; channel 2 checks what a publish
 * needs first (that its exchange exists, that its delay queue is declared),
 * so a missing exchange fails only the publishes that name it, never the
 * others in flight. Confirms are matched by sequence number; a basic.return
 * by the message's exchange, routing key, id and body, to the oldest such
 * publish in flight.
 *
 * Owner and cancellation: the broker owns the publisher; each queued
 * publish belongs to its caller (a waiting job) until its callback runs or
 * the caller forgets it. Callbacks never run inside wr_publisher_send. */
#ifndef WARREN_PUBLISHER_H
#define WARREN_PUBLISHER_H

#include <amqp.h>
#include <ev.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct wr_publisher wr_publisher;

typedef struct wr_message {
    amqp_bytes_t exchange;
    amqp_bytes_t routing_key;
    amqp_bytes_t body;
    amqp_basic_properties_t props;
    bool mandatory; /* return it (an error) when no queue takes it */
    /* When set, the message goes to this delay queue (through the default
     * exchange), declared first if needed: its messages wait delay_ms and
     * are then dead-lettered to delay_target. */
    const char *delay_queue;
    long delay_ms;
    const char *delay_target;
} wr_message;

/* err is NULL when the broker confirmed the message, else why it did not. */
typedef void (*wr_confirm_fn)(void *ctx, const char *err);

wr_publisher *wr_publisher_new(struct ev_loop *loop);
void wr_publisher_free(wr_publisher *p);

/* The broker to publish to: the URL the consumer uses. When it changes,
 * the connection to the old one is dropped and its publishes fail. */
void wr_publisher_target(wr_publisher *p, const char *url, int heartbeat);

/* Queues a copy of m; cb(ctx, err) runs exactly once, later, unless the
 * publish is forgotten. Returns an id > 0, or 0 with a message in err when
 * it cannot be published at all (no broker yet, a user_id that is not the
 * login name, out of memory). */
uint64_t wr_publisher_send(wr_publisher *p, const wr_message *m, wr_confirm_fn cb, void *ctx,
                           char *err, size_t errlen);

/* Drops a queued publish: its callback will not run. A publish the socket
 * has already begun to take still reaches the broker. */
void wr_publisher_forget(wr_publisher *p, uint64_t id);

/* Ends the connection now; queued publishes are dropped without callbacks
 * (their jobs are over). */
void wr_publisher_abort(wr_publisher *p);

/* See wr_wire_keepalive. */
void wr_publisher_keepalive(wr_publisher *p);

#endif
