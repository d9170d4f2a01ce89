/* The ack-coalescing rule without a broker: a simulated broker's view of
 * unacked tags proves that no multiple ack ever covers a tag its job did
 * not settle, and that every ack arrives exactly once. */
#include <string.h>

#include "check.h"
#include "warren/ledger.h"

#define MAXTAG 20000

enum { RUNNING, ACKED, RETURNED, NEVER }; /* RETURNED: requeued or rejected */

/* What the broker believes about one channel opening: which tags wait for a
 * settle, and what each job did. */
typedef struct broker_view {
    unsigned char outstanding[MAXTAG + 1]; /* 1 while the broker waits for a settle */
    unsigned char how[MAXTAG + 1];         /* RUNNING, ACKED, RETURNED or NEVER */
    int acked_times[MAXTAG + 1];
    uint64_t collected[MAXTAG]; /* acks of this turn, in settle order */
    size_t ncollected;
    uint64_t next; /* the tag the broker sends next */
    uint64_t lo;   /* every tag below it is settled */
} broker_view;

static broker_view v;
static uint64_t singles[MAXTAG];

static void reset_view(void) {
    memset(&v, 0, sizeof v);
    v.next = v.lo = 1;
}

/* The broker sends the next tag; a NEVER delivery's content never arrives
 * whole, so no job ever settles it. */
static uint64_t deliver(wr_ledger *l, int how) {
    uint64_t tag = v.next++;
    CHECK(wr_ledger_receive(l, tag) == 0);
    v.outstanding[tag] = 1;
    v.how[tag] = (unsigned char)how;
    return tag;
}

/* The job of tag settles: acks are collected, the others go out at once. */
static void settle(wr_ledger *l, uint64_t tag, bool ack) {
    CHECK(wr_ledger_settle(l, tag, ack) == 0);
    v.how[tag] = ack ? ACKED : RETURNED;
    if (ack)
        v.collected[v.ncollected++] = tag;
    else
        v.outstanding[tag] = 0;
}

/* The oldest tag the broker still waits on a job for, or 0. */
static uint64_t model_oldest(void) {
    while (v.lo < v.next && (v.how[v.lo] == ACKED || v.how[v.lo] == RETURNED))
        v.lo++;
    return v.lo < v.next ? v.lo : 0;
}

/* Flushes, applying the acks as the broker would (a multiple ack of T
 * removes every unacked tag up to T), and checks (a): the broker still held
 * each acked tag, and each tag a multiple ack removes was acked by its job.
 * Also checks the plan against the rule computed from the view. Returns the
 * multiple ack's tag. */
static uint64_t flush(wr_ledger *l) {
    uint64_t oldest = model_oldest();
    CHECK(wr_ledger_oldest(l) == oldest);
    CHECK(wr_ledger_collected(l) == v.ncollected);
    CHECK(wr_ledger_pending(l) == (v.ncollected > 0));
    uint64_t want = 0;
    size_t nwant = 0;
    for (size_t i = 0; i < v.ncollected; i++) {
        uint64_t t = v.collected[i];
        if (oldest == 0 || t < oldest)
            want = t > want ? t : want;
        else
            nwant++;
    }
    uint64_t multiple;
    size_t n;
    wr_ledger_flush(l, &multiple, singles, &n);
    CHECK(multiple == want);
    CHECK(n == nwant);
    for (size_t i = 0, j = 0; i < n; i++) {
        while (j < v.ncollected && oldest && v.collected[j] < oldest)
            j++;
        CHECK(j < v.ncollected && singles[i] == v.collected[j]);
        j++;
        uint64_t t = singles[i];
        CHECK(v.how[t] == ACKED);
        CHECK(v.outstanding[t] == 1);
        v.outstanding[t] = 0;
        v.acked_times[t]++;
    }
    /* RabbitMQ closes the channel on a multiple ack of a tag it does not hold. */
    CHECK(multiple == 0 || v.outstanding[multiple] == 1);
    for (uint64_t t = 1; t <= multiple; t++) {
        if (!v.outstanding[t]) continue;
        CHECK(v.how[t] == ACKED); /* never a running or unfinished delivery */
        v.outstanding[t] = 0;
        v.acked_times[t]++;
    }
    v.ncollected = 0;
    CHECK(wr_ledger_collected(l) == 0 && !wr_ledger_pending(l));
    return multiple;
}

/* (b): every tag a job acked reached the broker exactly once, and nothing
 * else was acked. */
static void check_acked_once(void) {
    for (uint64_t t = 1; t < v.next; t++) {
        CHECK(v.acked_times[t] == (v.how[t] == ACKED));
        CHECK(v.outstanding[t] == (v.how[t] == RUNNING || v.how[t] == NEVER));
    }
}

static void coalesces_contiguous_acks_into_one_multiple(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    CHECK(!wr_ledger_pending(&l) && wr_ledger_oldest(&l) == 0);
    for (int i = 0; i < 5; i++)
        deliver(&l, RUNNING);
    CHECK(wr_ledger_oldest(&l) == 1 && wr_ledger_unsettled(&l) == 5);
    for (uint64_t t = 1; t <= 5; t++)
        settle(&l, t, true);
    CHECK(wr_ledger_pending(&l) && wr_ledger_collected(&l) == 5);
    CHECK(flush(&l) == 5);
    CHECK(wr_ledger_oldest(&l) == 0);
    CHECK(wr_ledger_unsettled(&l) == 0);
    check_acked_once();
    wr_ledger_free(&l);
}

static void a_running_job_splits_the_acks(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    for (int i = 0; i < 6; i++)
        deliver(&l, RUNNING);
    settle(&l, 1, true);
    settle(&l, 2, true);
    settle(&l, 6, true); /* 3 still runs */
    settle(&l, 5, false);
    settle(&l, 4, true);
    CHECK(flush(&l) == 2);
    CHECK(singles[0] == 6 && singles[1] == 4); /* in settle order */
    CHECK(wr_ledger_oldest(&l) == 3);
    CHECK(wr_ledger_unsettled(&l) == 1);
    settle(&l, 3, true);
    CHECK(flush(&l) == 3);
    CHECK(wr_ledger_oldest(&l) == 0);
    check_acked_once();
    wr_ledger_free(&l);
}

/* (b): acks held back by a blocker go out once, whether the blocker ends up
 * acked or requeued, and later multiple acks pass over them harmlessly. */
static void acks_behind_a_blocker_go_out_exactly_once(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    for (int i = 0; i < 5; i++)
        deliver(&l, RUNNING);
    settle(&l, 1, true);
    settle(&l, 3, true);
    settle(&l, 5, true);
    CHECK(flush(&l) == 1); /* 3 and 5 as singles */
    settle(&l, 2, false);  /* the blocker requeued */
    CHECK(!wr_ledger_pending(&l));
    CHECK(wr_ledger_oldest(&l) == 4);
    settle(&l, 4, true);
    CHECK(flush(&l) == 4);
    deliver(&l, RUNNING);
    settle(&l, 6, true);
    CHECK(flush(&l) == 6);
    check_acked_once();
    wr_ledger_free(&l);
}

/* (c) */
static void a_delivery_that_never_completed_blocks_multiple_acks(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    deliver(&l, RUNNING);
    deliver(&l, NEVER); /* tag 2: its body never arrived */
    for (int i = 0; i < 3; i++)
        deliver(&l, RUNNING);
    for (uint64_t t = 5; t >= 3; t--)
        settle(&l, t, true);
    settle(&l, 1, true);
    CHECK(flush(&l) == 1);
    CHECK(wr_ledger_oldest(&l) == 2 && wr_ledger_unsettled(&l) == 1);
    deliver(&l, RUNNING);
    settle(&l, 6, true);
    CHECK(flush(&l) == 0);
    CHECK(v.outstanding[2] == 1);
    check_acked_once();
    wr_ledger_free(&l);
}

/* (d) */
static void refuses_gaps_repeats_and_foreign_settles(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    CHECK(wr_ledger_receive(&l, 0) == -1);
    CHECK(wr_ledger_receive(&l, 2) == -1); /* 1 comes first */
    CHECK(wr_ledger_unsettled(&l) == 0 && wr_ledger_oldest(&l) == 0);
    CHECK(wr_ledger_receive(&l, 1) == 0);
    CHECK(wr_ledger_receive(&l, 1) == -1); /* a repeat */
    CHECK(wr_ledger_receive(&l, 3) == -1); /* a gap */
    CHECK(wr_ledger_unsettled(&l) == 1);
    CHECK(wr_ledger_receive(&l, 2) == 0);       /* the refusals recorded nothing */
    CHECK(wr_ledger_settle(&l, 3, true) == -1); /* never received */
    CHECK(wr_ledger_settle(&l, 0, true) == -1);
    CHECK(wr_ledger_settle(&l, 1, true) == 0);
    CHECK(wr_ledger_settle(&l, 1, true) == -1);  /* settled twice */
    CHECK(wr_ledger_settle(&l, 1, false) == -1); /* nor requeued after its ack */
    CHECK(wr_ledger_settle(&l, 2, false) == 0);
    CHECK(wr_ledger_settle(&l, 2, true) == -1);
    CHECK(wr_ledger_collected(&l) == 1 && wr_ledger_unsettled(&l) == 0);
    CHECK(wr_ledger_receive(&l, 3) == 0);
    CHECK(wr_ledger_receive(&l, 4) == 0);
    CHECK(wr_ledger_settle(&l, 4, true) == 0);
    CHECK(wr_ledger_settle(&l, 4, true) == -1); /* settled, above the unsettled 3 */
    CHECK(wr_ledger_settle(&l, 4, false) == -1);
    CHECK(wr_ledger_settle(&l, 5, true) == -1);
    CHECK(wr_ledger_collected(&l) == 2 && wr_ledger_unsettled(&l) == 1);
    wr_ledger_free(&l);
}

/* (e) */
static void reset_forgets_the_channel(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    for (uint64_t t = 1; t <= 100; t++)
        CHECK(wr_ledger_receive(&l, t) == 0);
    CHECK(wr_ledger_settle(&l, 2, true) == 0);
    CHECK(wr_ledger_settle(&l, 3, false) == 0);
    wr_ledger_reset(&l);
    CHECK(!wr_ledger_pending(&l) && wr_ledger_collected(&l) == 0);
    CHECK(wr_ledger_unsettled(&l) == 0);
    CHECK(wr_ledger_oldest(&l) == 0);
    CHECK(wr_ledger_settle(&l, 1, true) == -1); /* the old channel's tags are dead */
    CHECK(wr_ledger_receive(&l, 101) == -1);
    CHECK(wr_ledger_receive(&l, 1) == 0); /* a new channel starts at 1 */
    CHECK(wr_ledger_receive(&l, 2) == 0);
    CHECK(wr_ledger_oldest(&l) == 1 && wr_ledger_unsettled(&l) == 2);
    CHECK(wr_ledger_settle(&l, 2, true) == 0);
    CHECK(wr_ledger_settle(&l, 1, true) == 0);
    uint64_t multiple, one[2];
    size_t n;
    wr_ledger_flush(&l, &multiple, one, &n);
    CHECK(multiple == 2 && n == 0);
    wr_ledger_free(&l);
    CHECK(wr_ledger_receive(&l, 1) == 0); /* free leaves it as init does */
    wr_ledger_free(&l);
}

/* A blocker held while the ring wraps and then grows keeps every tag's
 * state in place. */
static void the_ring_grows_while_wrapped(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    reset_view();
    for (int i = 0; i < 50; i++)
        deliver(&l, RUNNING);
    for (uint64_t t = 1; t <= 40; t++)
        settle(&l, t, true);
    CHECK(flush(&l) == 40);
    for (int i = 0; i < 500; i++)
        deliver(&l, RUNNING); /* 51..550 */
    for (uint64_t t = 42; t <= 550; t += 2)
        settle(&l, t, true);
    CHECK(flush(&l) == 0);
    CHECK(wr_ledger_oldest(&l) == 41 && wr_ledger_unsettled(&l) == 255);
    for (uint64_t t = 41; t <= 549; t += 2)
        settle(&l, t, t % 4 == 1);
    CHECK(flush(&l) == 549);
    CHECK(wr_ledger_oldest(&l) == 0 && wr_ledger_unsettled(&l) == 0);
    check_acked_once();
    wr_ledger_free(&l);
}

/* xorshift64*: the same sequence on every platform. */
static uint64_t rng = 0x9E3779B97F4A7C15u;

static uint64_t draw(uint64_t n) {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (rng * 0x2545F4914F6CDD1Du >> 32) % n;
}

/* (f): random interleavings of deliveries (some never complete), acks,
 * requeues, rejects, flushes and lost channels, up to a prefetch of 64.
 * Every flush checks (a) and the plan; every channel's end checks that no
 * ack went out twice or for a tag not acked, and the last channel, whose
 * blockers all settle, checks (b). */
static void random_sequences_keep_the_rule(void) {
    wr_ledger l;
    wr_ledger_init(&l);
    long multiples = 0, steps = 0;
    for (int round = 0; round < 10; round++) {
        reset_view();
        uint64_t running[64];
        size_t nrunning = 0, inflight = 0;
        for (int step = 0; step < 10000 && v.next < MAXTAG; step++, steps++) {
            uint64_t r = draw(1000);
            if (r < 400 && inflight < 64) {
                int never = draw(300) == 0;
                uint64_t t = deliver(&l, never ? NEVER : RUNNING);
                if (!never) running[nrunning++] = t;
                inflight++;
            } else if (r < 800 && nrunning) {
                size_t i = (size_t)draw(nrunning);
                settle(&l, running[i], draw(10) < 7);
                running[i] = running[--nrunning];
                inflight--;
            } else if (r < 998) {
                multiples += flush(&l) != 0;
            } else {
                /* The channel is lost: its tags die, the broker requeues them. */
                for (uint64_t t = 1; t < v.next; t++)
                    CHECK(v.acked_times[t] <= (v.how[t] == ACKED));
                wr_ledger_reset(&l);
                CHECK(wr_ledger_oldest(&l) == 0 && !wr_ledger_pending(&l));
                reset_view();
                nrunning = inflight = 0;
            }
            CHECK(wr_ledger_unsettled(&l) == inflight);
        }
        while (nrunning)
            settle(&l, running[--nrunning], true);
        flush(&l);
        check_acked_once();
        wr_ledger_reset(&l);
    }
    wr_ledger_free(&l);
    CHECK(steps >= 90000);
    CHECK(multiples > 1000); /* the runs did exercise coalescing */
}

int main(void) {
    coalesces_contiguous_acks_into_one_multiple();
    a_running_job_splits_the_acks();
    acks_behind_a_blocker_go_out_exactly_once();
    a_delivery_that_never_completed_blocks_multiple_acks();
    refuses_gaps_repeats_and_foreign_settles();
    reset_forgets_the_channel();
    the_ring_grows_while_wrapped();
    random_sequences_keep_the_rule();
    return REPORT("ledger_test");
}
