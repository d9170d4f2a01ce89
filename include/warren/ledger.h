/* The ack ledger of one channel opening: which delivery tags arrived,
 * which are settled, and which acks of this loop turn wait to be sent.
 * Pure: no I/O. It owns a ring of per-tag states, from the oldest
 * unsettled tag to the newest received, and the turn's collected acks;
 * both grow to the largest window seen and are reused after that, so the
 * steady state allocates nothing.
 *
 * The rule it enforces: acks below the oldest unsettled tag go out as one
 * multiple ack, the others one by one, so a multiple ack never covers a
 * tag whose job did not settle it, including a delivery whose content never
 * arrived whole (its tag is recorded when the basic.deliver method comes).
 * Requeues and rejects are the caller's to send at once; the ledger only
 * marks their tags settled. */
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

/* Prepares an empty ledger expecting tag 1. Allocates nothing; cannot fail. */
void wr_ledger_init(wr_ledger *l);

/* Releases the ledger's memory and leaves it as wr_ledger_init does. */
void wr_ledger_free(wr_ledger *l);

/* Forgets everything: the channel is gone, its tags died with it, and acks
 * not yet flushed are dropped (the broker requeues their messages). The
 * next tag expected is 1 again. Keeps the memory for the next opening. */
void wr_ledger_reset(wr_ledger *l);

/* Records a basic.deliver's tag as unsettled. Returns 0, or -1 when tag is
 * not the next one expected (a gap or a repeat, a protocol error) or out of
 * memory; on -1 nothing is recorded and the tag expected stays the same. */
int wr_ledger_receive(wr_ledger *l, uint64_t tag);

/* Marks tag settled; an ack is collected for the next flush, a requeue or
 * reject (ack false) the caller sends itself at once. Returns 0, or -1 when
 * tag is not an unsettled tag of this ledger (never received, already
 * settled, or of a channel before the last reset) or out of memory; on -1
 * nothing changes. */
int wr_ledger_settle(wr_ledger *l, uint64_t tag, bool ack);

/* Whether acks wait for the flush. */
bool wr_ledger_pending(const wr_ledger *l);

/* How many acks wait for the flush. */
size_t wr_ledger_collected(const wr_ledger *l);

/* Plans the flush and clears the collected acks: *multiple is the tag for
 * one multiple ack (0 for none): the highest collected ack below the oldest
 * unsettled tag, so the broker still holds that tag itself and every tag
 * the ack covers was settled. singles[0..*nsingles) are the collected acks
 * above an unsettled tag, to be acked one by one, in the order their jobs
 * settled them. singles needs room for wr_ledger_collected() tags. Cannot
 * fail. */
void wr_ledger_flush(wr_ledger *l, uint64_t *multiple, uint64_t *singles, size_t *nsingles);

/* The oldest unsettled tag, or 0 when none. */
uint64_t wr_ledger_oldest(const wr_ledger *l);

/* How many received tags are not settled. */
size_t wr_ledger_unsettled(const wr_ledger *l);

#endif
