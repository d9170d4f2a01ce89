/* The consuming side of the broker: one connection (a wr_wire) with a
 * channel per queue of the configuration (channel N+1 for queue N), each
 * with its own basic.qos (the queue's prefetch), queue check, basic.consume,
 * deliveries assembled from its frames and acks; cancel and a clean close.
 * A queue's channel failing a re-consume, or its consumer being cancelled,
 * leaves the other queues' channels alone. Every request and its reply are
 * events on the loop: nothing here waits on the network. Publishing has a
 * connection of its own (wr_publisher), so a broker that blocks publishers
 * (a memory alarm) never holds up acks.
 *
 * Owner and cancellation: the host owns the broker and its events. A
 * connection attempt ends in `consuming` (every queue) or `failed`; a
 * connection that was consuming ends in `lost`, or in `closed` after
 * wr_broker_close; wr_broker_abort ends everything at once with no event. */
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

/* The queue of an event that is about the whole connection attempt. */
#define WR_ALL_QUEUES ((size_t)-1)

typedef struct wr_broker_events {
    /* Consuming: every queue after a connection attempt (q is
     * WR_ALL_QUEUES), or queue q after wr_broker_consume. */
    void (*consuming)(void *ud, size_t q);
    /* A connection attempt (every URL tried; q is WR_ALL_QUEUES) or a
     * wr_broker_consume of queue q failed; err is one line. After a failed
     * wr_broker_consume the connection stays up and a later call may
     * succeed. */
    void (*failed)(void *ud, size_t q, wr_broker_status st, const char *err);
    /* A complete delivery (d->qi and d->queue say of which queue); the
     * receiver owns it until wr_broker_release. */
    void (*delivery)(void *ud, wr_delivery *d);
    /* The broker cancelled the consumer of queue q (queue deleted, node
     * failover); the other queues go on. */
    void (*cancelled)(void *ud, size_t q);
    /* The connection that was consuming is gone; why says what happened. */
    void (*lost)(void *ud, const char *why);
    /* wr_broker_close has ended: clean when the broker confirmed the close,
     * so every ack sent before it was processed. */
    void (*closed)(void *ud, bool clean);
    /* The answer to wr_broker_ask_depth: messages ready in queue q. */
    void (*depth)(void *ud, size_t q, uint32_t ready);
} wr_broker_events;

/* Creates an unconnected broker for the queues of cfg on loop. NULL when
 * out of memory. */
wr_broker *wr_broker_new(struct ev_loop *loop, const wr_config *cfg, const wr_broker_events *ev,
                         void *ud);

/* Starts an attempt: each URL once, starting with the one that worked last,
 * each bounded by a few seconds and the whole by timeout seconds (0: no
 * bound beyond the per-URL one). Ends in `consuming` or `failed`. */
void wr_broker_connect(wr_broker *b, double timeout);

/* Whether the connection is up (its channels may still be opening). */
bool wr_broker_connected(const wr_broker *b);

/* The URL in use, without the password, for logs. */
const char *wr_broker_where(const wr_broker *b);

/* Settles a delivery of its queue's channel as it is open now. A nack or reject is
 * sent at once; acks wait for the end of the loop turn, when every ack
 * below the oldest unsettled delivery goes out as one multiple ack (see
 * wr_ledger). Returns 0, or -1 when the delivery came on an earlier channel
 * or connection (its tag died with it). */
int wr_broker_settle(wr_broker *b, wr_delivery *d, wr_settle how);

/* The publisher, which follows this broker's URL (never NULL). */
wr_publisher *wr_broker_publisher(wr_broker *b);

/* Returns a delivery's memory for reuse. */
void wr_broker_release(wr_broker *b, wr_delivery *d);

/* Asks the broker to stop delivering from queue q (basic.cancel);
 * deliveries may still arrive until cancel-ok. Returns 0, or -1 when q is
 * not being consumed. */
int wr_broker_cancel(wr_broker *b, size_t q);

/* Asks how many messages are ready in queue q (a passive queue.declare on
 * its channel, so every delivery the broker sent before its answer has
 * arrived by then); `depth` answers. Returns 0, or -1 when q is not being
 * consumed. A channel that closes first drops the question. */
int wr_broker_ask_depth(wr_broker *b, size_t q);

/* Checks (or declares) queue q and consumes it again after the broker
 * cancelled its consumer. Ends in `consuming` or `failed` for q. Returns 0,
 * or -1 when its channel cannot take it now (no event follows then). */
int wr_broker_consume(wr_broker *b, size_t q);

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
