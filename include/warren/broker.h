/* The AMQP side: connect (TCP or TLS), log in, qos, check the queue and
 * consume on channel 1; an ev_io on the socket and a heartbeat timer that
 * both call a pump reading frames without blocking; ack, nack, reject and
 * cancel. rabbitmq-c does nothing in the background, so the pump is also
 * what sends heartbeats. */
#ifndef WARREN_BROKER_H
#define WARREN_BROKER_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "warren/config.h"
#include "warren/delivery.h"
#include "warren/publisher.h"

typedef struct wr_broker wr_broker;

/* What a connection attempt ran into; the exit code follows from it. */
typedef enum {
    WR_BROKER_OK = 0,
    WR_BROKER_UNREACHABLE = -1, /* network, refused, timeout: worth retrying */
    WR_BROKER_REFUSED = -2,     /* wrong credentials or no access to the vhost */
    WR_BROKER_NO_QUEUE = -3,    /* the queue does not exist (and --declare is off) */
    WR_BROKER_FAILED = -4,      /* any other protocol error */
} wr_broker_status;

typedef enum { WR_SETTLE_ACK, WR_SETTLE_REQUEUE, WR_SETTLE_REJECT } wr_settle;

typedef struct wr_broker_events {
    /* A complete delivery; the receiver owns it until wr_broker_release. */
    void (*delivery)(void *ud, wr_delivery *d);
    /* The broker cancelled the consumer (queue deleted, node failover). */
    void (*cancelled)(void *ud);
    /* The connection or the channel is gone; why says what happened. Called
     * from the loop, never from inside another broker call. */
    void (*lost)(void *ud, const char *why);
} wr_broker_events;

/* Creates an unconnected broker for cfg on loop. NULL when out of memory. */
wr_broker *wr_broker_new(struct ev_loop *loop, const wr_config *cfg, const wr_broker_events *ev,
                         void *ud);

/* Tries each URL once, starting with the one that worked last, until one
 * connects and consumes. Blocks for at most a few seconds per URL. Returns
 * WR_BROKER_OK, or a status with a one-line message in err. */
wr_broker_status wr_broker_connect(wr_broker *b, char *err, size_t errlen);

bool wr_broker_connected(const wr_broker *b);

/* The URL in use, without the password, for logs. */
const char *wr_broker_where(const wr_broker *b);

/* Settles a delivery of the channel as it is open now. A nack or reject is sent at
 * once; acks wait for the end of the loop turn, when every ack below the
 * oldest unsettled delivery goes out as one multiple ack. Returns 0, or -1
 * when the delivery came on an earlier channel or connection (its tag died
 * with it), or the write failed (lost is then reported). */
int wr_broker_settle(wr_broker *b, wr_delivery *d, wr_settle how);

/* The publisher on this broker's connections (never NULL). */
wr_publisher *wr_broker_publisher(wr_broker *b);

/* Returns a delivery's memory for reuse. */
void wr_broker_release(wr_broker *b, wr_delivery *d);

/* Asks the broker to stop delivering (basic.cancel, not waiting for the
 * reply); deliveries may still arrive until cancel-ok. Returns 0 or -1. */
int wr_broker_cancel(wr_broker *b);

/* Checks (or declares) the queue and issues basic.consume; used when
 * connecting and after a broker-initiated cancel. Returns WR_BROKER_OK or a
 * status with a message in err; after a missing queue the channel is
 * re-opened so that a later call can retry. */
wr_broker_status wr_broker_consume(wr_broker *b, char *err, size_t errlen);

/* Closes channel and connection cleanly, waiting at most timeout seconds
 * for the broker's replies, and frees the connection. Safe when not
 * connected. */
void wr_broker_close(wr_broker *b, double timeout);

void wr_broker_free(wr_broker *b);

#endif
