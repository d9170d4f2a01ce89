/* Publishing with confirms on a channel of its own (channel 2), so that a
 * publish error (a missing exchange closes the channel) never touches the
 * consuming channel. The channel is opened on first use and re-opened after
 * an error. Callbacks run from the broker's pump, once per publish. */
#ifndef WARREN_PUBLISHER_H
#define WARREN_PUBLISHER_H

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct wr_publisher wr_publisher;

typedef struct wr_message {
    amqp_bytes_t exchange;
    amqp_bytes_t routing_key;
    amqp_bytes_t body;
    amqp_basic_properties_t props; /* message_id is required: returns are matched by it */
    bool mandatory;                /* return it (an error) when no queue takes it */
} wr_message;

/* err is NULL when the broker confirmed the message, else why it did not. */
typedef void (*wr_confirm_fn)(void *ctx, const char *err);

wr_publisher *wr_publisher_new(void);
void wr_publisher_free(wr_publisher *p);

/* Binds to a new connection (conn) or to none (NULL). Pending publishes of
 * the previous connection are dropped without callbacks: their jobs were
 * interrupted with it. */
void wr_publisher_bind(wr_publisher *p, amqp_connection_state_t conn);

/* Handles a frame of the publishing channel. Returns 0, or -1 when the
 * connection can no longer be used (a send failed). */
int wr_publisher_frame(wr_publisher *p, const amqp_frame_t *f);

/* Publishes m; cb(ctx, err) runs once when the broker confirms, rejects or
 * returns it, or the channel fails. Returns a sequence number > 0, or 0
 * with a message in err when it could not be sent (no connection, channel
 * cannot open). */
uint64_t wr_publisher_send(wr_publisher *p, const wr_message *m, wr_confirm_fn cb, void *ctx,
                           char *err, size_t errlen);

/* Drops a pending publish: its callback will not run. */
void wr_publisher_forget(wr_publisher *p, uint64_t seq);

/* Declares (once per connection) a durable queue whose messages wait ttl_ms
 * and are then dead-lettered to target through the default exchange.
 * Returns 0, or -1 with a message in err. */
int wr_publisher_delay_queue(wr_publisher *p, const char *name, long ttl_ms, const char *target,
                             char *err, size_t errlen);

#endif
