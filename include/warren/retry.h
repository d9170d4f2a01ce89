/* Delayed retries: a copy of a message, its x-warren-retries header one
 * higher, waits in the delay queue QUEUE.retry.MS (durable, declared on
 * first use with x-message-ttl MS, dead-lettering back to QUEUE) and the
 * original is settled once the broker has confirmed the copy: acked, or
 * requeued when the copy failed. warren.retry goes this way from a job; the
 * failure policy goes this way from the host, through a wr_retrier, once the
 * job is gone. */
#ifndef WARREN_RETRY_H
#define WARREN_RETRY_H

#include <amqp.h>
#include <stddef.h>

#include "warren/delivery.h"
#include "warren/publisher.h"

#define WR_RETRIES_HEADER "x-warren-retries"

/* The x-warren-retries header of d: 0 when absent or not an integer. */
long wr_retry_count(const wr_delivery *d);

/* Fills m with the copy of d for delay_queue, whose messages wait delay_ms
 * and then go back to queue: the same body and properties (persistent
 * unless d says otherwise), the retries header set to retries + 1, no
 * x-delivery-count (the broker's count of the original), and,
 * when d has no message id, `warren-PID-rN` (so that consumers can
 * deduplicate). m points into d, queue, delay_queue and pool. Returns 0,
 * or -1 when out of memory. */
int wr_retry_copy(wr_message *m, const wr_delivery *d, const char *queue, const char *delay_queue,
                  long delay_ms, long retries, amqp_pool_t *pool);

typedef struct wr_retrier wr_retrier;

/* Called once for each delivery handed to wr_retrier_send: err is NULL
 * when the broker confirmed the copy (ack the original), else why it did
 * not or why the wait was given up (hand the original back). The delivery
 * is the caller's again. */
typedef void (*wr_retried_fn)(void *ud, wr_delivery *d, const char *err);

/* A retrier through pub; each copy goes back, after its delay, to the queue
 * its original came from (d->queue). NULL when out of memory. */
wr_retrier *wr_retrier_new(wr_publisher *pub, wr_retried_fn done, void *ud);

/* Frees the retrier; nothing may be pending (wr_retrier_abandon first). */
void wr_retrier_free(wr_retrier *r);

/* Publishes the copy of d to the delay queue of delay_ms and keeps d until
 * the broker answers; done is then called. The copy's message id goes into
 * copy_id. Returns 0, or -1 with a message in err when the copy could not be
 * sent: done is not called and d is still the caller's. */
int wr_retrier_send(wr_retrier *r, wr_delivery *d, long delay_ms, char *copy_id, size_t idlen,
                    char *err, size_t errlen);

/* Deliveries waiting for their copy's confirm. */
size_t wr_retrier_pending(const wr_retrier *r);

/* Stops waiting for every pending confirm (the connection is lost, or the
 * worker is forced to stop): done is called for each with an error. */
void wr_retrier_abandon(wr_retrier *r);

#endif
