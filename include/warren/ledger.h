/* The ack ledger of one channel opening: which delivery tags arrived,
 * which are settled, and which acks of this loop turn wait to be sent.
 * Pure: no I/O. It owns a ring of per-tag states, from the oldest
 * unsettled tag to the newest received, and the turn's collected acks.
 *
 * The rule it enforces: acks below the oldest unsettled tag go out as one
 * multiple ack, the others one by one, so a multiple ack never covers a
 * tag whose job did not settle it, including a delivery whose content never
 * arrived whole (its tag is recorded when the basic.deliver method comes). */
#ifndef WARREN_LEDGER_H
#define WARREN_LEDGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct wr_ledger {
    uint64_t base;        /* tag of state[head]: the oldest not known settled */
    uint64_t next;        /* the tag expected next */
    unsigned char *state; /* ring: 1 = settled, 0 = unsettled, for tags base..next-1 */
    size_t head, cap;     /* ring start and size (a power of two) */
    size_t unsettled;     /* tags in base..next-1 not settled */
    uint64_t *acks;       /* collected this turn, in settle order */
    size_t nacks, acks_cap;
} wr_ledger;

void wr_ledger_init(wr_ledger *l);
void wr_ledger_free(wr_ledger *l);

/* Forgets everything: the channel is gone, its tags died with it. The next
 * tag expected is 1 again. */
void wr_ledger_reset(wr_ledger *l);

/* Records a basic.deliver's tag as unsettled. Returns 0, or -1 when tag is
 * not the next one expected (a protocol error: nothing is recorded) or out
 * of memory. */
int wr_ledger_receive(wr_ledger *l, uint64_t tag);

/* Marks tag settled; an ack is collected for the next flush, a requeue or
 * reject the caller sends itself at once. Returns 0, or -1 when tag is not
 * an unsettled tag of this ledger, or out of memory (nothing changes). */
int wr_ledger_settle(wr_ledger *l, uint64_t tag, bool ack);

/* How many acks wait for the flush. */
size_t wr_ledger_collected(const wr_ledger *l);

/* Plans the flush and clears the collected acks: *multiple is the tag of one
 * multiple ack (0 for none), covering only settled tags; singles[0..
 * *nsingles) are to be acked one by one. singles needs room for
 * wr_ledger_collected() tags. */
void wr_ledger_flush(wr_ledger *l, uint64_t *multiple, uint64_t *singles, size_t *nsingles);

/* The oldest unsettled tag, or 0 when none. */
uint64_t wr_ledger_oldest(const wr_ledger *l);

/* How many received tags are not settled. */
size_t wr_ledger_unsettled(const wr_ledger *l);

#endif
