/* The consuming side of the broker: one connection (a wr_wire) with channel
 * 1 for qos, the queue check and basic.consume; deliveries assembled from
 * its frames; acks, nacks and rejects; cancel and a clean close. Every
 * request and its reply are events on the loop: nothing here waits on the
 * network. Publishing has a connection of its own (wr_publisher), so a
 * broker that blocks publishers (a memory alarm) never holds up acks.
 *
 * Owner and cancellation: the host owns the broker and its events. A
 * connection attempt ends in `consuming` or `failed`; a connection that was
 * consuming ends in `lost`, or in `closed` after wr_broker_close;
 * wr_broker_abort ends everything at once with no event. */
#ifndef WARREN_BROKER_H
#define WARREN_BROKER_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "warren/config.h"
#include "warren/delivery.h"
#include "warren/publisher.h"
#include "warren/wire.h"

typedef struct wr_broker wr_broker;

typedef enum { WR_SETTLE_ACK, WR_SETTLE_REQUEUE, WR_SETTLE_REJECT } wr_settle;

typedef struct wr_broker_events {
    /* Consuming: after a connection attempt, or after wr_broker_consume. */
    void (*consuming)(void *ud);
    /* A connection attempt (every URL tried) or a wr_broker_consume failed;
     * err is one line. After a failed wr_broker_consume the connection
     * stays up and a later call may succeed. */
    void (*failed)(void *ud, wr_broker_status st, const char *err);
    /* A complete delivery; the receiver owns it until wr_broker_release. */
    void (*delivery)(void *ud, wr_delivery *d);
    /* The broker cancelled the consumer (queue deleted, node failover). */
    void (*cancelled)(void *ud);
    /* The connection that was consuming is gone; why says what happened. */
    void (*lost)(void *ud, const char *why);
    /* wr_broker_close has ended: clean when the broker confirmed the close,
     * so every ack sent before it was processed. */
    void (*closed)(void *ud, bool clean);
    /* The answer to wr_broker_ask_depth: messages ready in the queue. */
    void (*depth)(void *ud, uint32_t ready);
} wr_broker_events;

/* Creates an unconnected broker for cfg on loop. NULL when out of memory. */
wr_broker *wr_broker_new(struct ev_loop *loop, const wr_config *cfg, const wr_broker_events *ev,
                         void *ud);

/* Starts an attempt: each URL once, starting with the one that worked last,
 * each bounded by a few seconds and the whole by timeout seconds (0: no
 * bound beyond the per-URL one). Ends in `consuming` or `failed`. */
void wr_broker_connect(wr_broker *b, double timeout);

/* Whether the connection is up and its channel usable. */
bool wr_broker_connected(const wr_broker *b);

/* The URL in use, without the password, for logs. */
const char *wr_broker_where(const wr_broker *b);

/* Settles a delivery of the channel as it is open now. A nack or reject is
 * sent at once; acks wait for the end of the loop turn, when every ack
 * below the oldest unsettled delivery goes out as one multiple ack (see
 * wr_ledger). Returns 0, or -1 when the delivery came on an earlier channel
 * or connection (its tag died with it). */
int wr_broker_settle(wr_broker *b, wr_delivery *d, wr_settle how);

/* The publisher, which follows this broker's URL (never NULL). */
wr_publisher *wr_broker_publisher(wr_broker *b);

/* Returns a delivery's memory for reuse. */
void wr_broker_release(wr_broker *b, wr_delivery *d);

/* Asks the broker to stop delivering (basic.cancel); deliveries may still
 * arrive until cancel-ok. Returns 0, or -1 when not consuming. */
int wr_broker_cancel(wr_broker *b);

/* Asks how many messages are ready in the queue (a passive queue.declare
 * on the consuming channel, so every delivery the broker sent before its
 * answer has arrived by then); `depth` answers. Returns 0, or -1 when not
 * consuming. A channel that closes first drops the question. */
int wr_broker_ask_depth(wr_broker *b);
/* Checks (or declares) the queue and consumes again after the broker
 * cancelled the consumer. Ends in `consuming` or `failed`. Returns 0, or -1
 * when the channel cannot take it now (no event follows then). */
int wr_broker_consume(wr_broker *b);

/* Sends the pending acks, closes the channel and the connection, and
 * reports `closed` once the broker confirmed, or after timeout seconds.
 * Returns 0, or -1 when not connected (no event follows then). */
int wr_broker_close(wr_broker *b, double timeout);

/* Ends both connections now, after one last attempt to write what is
 * queued (acks and nacks among it). No event follows. */
void wr_broker_abort(wr_broker *b);

/* For a computation that cannot yield: keeps both connections' heartbeats
 * going without handling any frame (wr_wire_keepalive). Safe from inside a
 * Lua hook. */
void wr_broker_keepalive(wr_broker *b);

void wr_broker_free(wr_broker *b);

#endif
