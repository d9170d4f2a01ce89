/* The ack-coalescing rule without a broker: a simulated broker's view of
 * unacked tags proves that no multiple ack ever covers a tag its job did
 * not settle, and that every ack arrives exactly once. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "warren/ledger.h"

#define MAXTAG 20000

/* What the broker believes: tags delivered and not yet settled by the
 * client, and what each settle was. */
typedef struct broker_view {
    unsigned char outstanding[MAXTAG + 1]; /* 1 while the broker waits for a settle */
    unsigned char how[MAXTAG + 1]; /* 0 running, 1 acked, 2 requeued/rejected, 3 never settles */
    int acked_times[MAXTAG + 1];
} broker_view;

static broker_view v;

static void deliver(wr_ledger *l, uint64_t tag, int how) {
    CHECK(wr_ledger_receive(l, tag) == 0);
    v.outstanding[tag] = 1;
    v.how[tag] = (unsigned char)how;
}

/* The job of tag settles: acks are collected, the others go out at once. */
static void settle(wr_ledger *l, uint64_t tag, bool ack) {
    CHECK(wr_ledger_settle(l, tag, ack) == 0);
    v.how[tag] = ack ? 1 : 2;
    if (!ack) v.outstanding[tag] = 0;
}

/* Flushes, applying the acks as the broker would, and checks that each tag
 * a multiple ack removes was acked by its job. */
static void flush(wr_ledger *l) {
    uint64_t singles[MAXTAG], multiple;
    size_t n;
    CHECK(wr_ledger_collected(l) <= MAXTAG);
    wr_ledger_flush(l, &multiple, singles, &n);
    for (size_t i = 0; i < n; i++) {
        uint64_t t = singles[i];
        CHECK(v.how[t] == 1);
        CHECK(v.outstanding[t] == 1);
        v.outstanding[t] = 0;
        v.acked_times[t]++;
    }
    for (uint64_t t = 1; t <= multiple; t++) {
        if (!v.outstanding[t]) continue;
        CHECK(v.how[t] == 1); /* never a running or unfinished delivery */
        v.outstanding[t] = 0;
        v.acked_times[t]++;
    }
    CHECK(wr_ledger_collected(l) == 0);
}

static void reset_view(void) {
    memset(&v, 0, sizeof v);
}

static void coalesces_contiguous_acks_into_one_multiple(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    for (uint64_t t = 1; t <= 5; t++)
        deliver(&l, t, 0);
    for (uint64_t t = 1; t <= 5; t++)
        settle(&l, t, true);
    uint64_t singles[5], multiple;
    size_t n;
    wr_ledger_flush(&l, &multiple, singles, &n);
    CHECK(multiple == 5);
    CHECK(n == 0);
    CHECK(wr_ledger_oldest(&l) == 0);
    CHECK(wr_ledger_unsettled(&l) == 0);
    wr_ledger_free(&l);
}

static void a_running_job_splits_the_acks(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    for (uint64_t t = 1; t <= 6; t++)
        deliver(&l, t, 0);
    settle(&l, 1, true);
    settle(&l, 2, true);
    settle(&l, 4, true); /* 3 still runs */
    settle(&l, 5, false);
    settle(&l, 6, true);
    uint64_t singles[6], multiple;
    size_t n;
    wr_ledger_flush(&l, &multiple, singles, &n);
    CHECK(multiple == 2);
    CHECK(n == 2 && singles[0] == 4 && singles[1] == 6);
    CHECK(wr_ledger_oldest(&l) == 3);
    CHECK(wr_ledger_unsettled(&l) == 1);
    settle(&l, 3, true);
    wr_ledger_flush(&l, &multiple, singles, &n);
    CHECK(multiple == 3 && n == 0);
    wr_ledger_free(&l);
}

static void a_delivery_that_never_completed_blocks_multiple_acks(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    deliver(&l, 1, 0);
    deliver(&l, 2, 3); /* its body never arrived: no job ever settles it */
    deliver(&l, 3, 0);
    settle(&l, 1, true);
    settle(&l, 3, true);
    flush(&l);
    CHECK(v.outstanding[2] == 1);
    CHECK(v.acked_times[1] == 1 && v.acked_times[3] == 1);
    wr_ledger_free(&l);
}

static void refuses_gaps_repeats_and_foreign_settles(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    CHECK(wr_ledger_receive(&l, 2) == -1); /* 1 comes first */
    CHECK(wr_ledger_receive(&l, 1) == 0);
    CHECK(wr_ledger_receive(&l, 1) == -1);
    CHECK(wr_ledger_receive(&l, 3) == -1);
    CHECK(wr_ledger_settle(&l, 2, true) == -1); /* never received */
    CHECK(wr_ledger_settle(&l, 0, true) == -1);
    CHECK(wr_ledger_settle(&l, 1, true) == 0);
    CHECK(wr_ledger_settle(&l, 1, true) == -1); /* settled twice */
    CHECK(wr_ledger_collected(&l) == 1);
    wr_ledger_free(&l);
}

static void reset_forgets_the_channel(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    CHECK(wr_ledger_receive(&l, 1) == 0);
    CHECK(wr_ledger_receive(&l, 2) == 0);
    CHECK(wr_ledger_settle(&l, 2, true) == 0);
    wr_ledger_reset(&l);
    CHECK(wr_ledger_collected(&l) == 0);
    CHECK(wr_ledger_unsettled(&l) == 0);
    CHECK(wr_ledger_oldest(&l) == 0);
    CHECK(wr_ledger_settle(&l, 1, true) == -1);
    CHECK(wr_ledger_receive(&l, 1) == 0); /* a new channel starts at 1 */
    wr_ledger_free(&l);
}

/* Random interleavings of deliveries, acks, requeues, rejects, unfinished
 * deliveries and flushes, with a fixed seed. */
static void random_sequences_keep_the_rule(void) {
    srand(12345);
    for (int round = 0; round < 20; round++) {
        wr_ledger l;
        wr_ledger_init(&l);
        reset_view();
        uint64_t next = 1, running[64];
        size_t nrunning = 0;
        for (int step = 0; step < 1000 && next < MAXTAG; step++) {
            int r = rand() % 10;
            if (r < 4 && nrunning < 64) {
                int never = rand() % 50 == 0;
                deliver(&l, next, never ? 3 : 0);
                if (!never) running[nrunning++] = next;
                next++;
            } else if (r < 8 && nrunning) {
                size_t i = (size_t)rand() % nrunning;
                settle(&l, running[i], rand() % 4 != 0);
                running[i] = running[--nrunning];
            } else {
                flush(&l);
            }
        }
        while (nrunning)
            settle(&l, running[--nrunning], true);
        flush(&l);
        for (uint64_t t = 1; t < next; t++) {
            if (v.how[t] == 1) CHECK(v.acked_times[t] == 1);
            if (v.how[t] == 3) CHECK(v.outstanding[t] == 1 && v.acked_times[t] == 0);
            if (v.how[t] == 2) CHECK(v.acked_times[t] == 0);
        }
        wr_ledger_free(&l);
    }
}

int main(void) {
    coalesces_contiguous_acks_into_one_multiple();
    a_running_job_splits_the_acks();
    a_delivery_that_never_completed_blocks_multiple_acks();
    refuses_gaps_repeats_and_foreign_settles();
    reset_forgets_the_channel();
    random_sequences_keep_the_rule();
    return REPORT("ledger_test");
}
