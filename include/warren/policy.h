/* The failure policy: what becomes of a message whose job failed (raised an
 * error, ran out of memory, ran past --job-timeout). Pure: the worker and
 * `warren try` take the same decision, and it is tested without a broker. */
#ifndef WARREN_POLICY_H
#define WARREN_POLICY_H

#include <stddef.h>

/* --on-error */
typedef enum {
    WR_ON_ERROR_RETRY,   /* a copy through a delay queue, with backoff, up to --max-retries */
    WR_ON_ERROR_REQUEUE, /* back to the queue at once, no count kept */
    WR_ON_ERROR_REJECT,  /* to the queue's dead-letter exchange at once */
} wr_on_error;

/* How a job failed. */
typedef enum {
    WR_FAIL_ERROR,   /* the script raised an error */
    WR_FAIL_MEMORY,  /* an allocation went past --memory-limit */
    WR_FAIL_TIMEOUT, /* the job ran past --job-timeout */
} wr_failure;

typedef enum { WR_VERDICT_RETRY, WR_VERDICT_REQUEUE, WR_VERDICT_REJECT } wr_verdict_action;

typedef struct wr_verdict {
    wr_failure failure;
    wr_on_error policy;
    wr_verdict_action action;
    long delay_ms; /* RETRY: how long the copy waits in the delay queue */
    long attempt;  /* RETRY: which retry this is, from 1; else the retries already used */
    long max;      /* --max-retries */
} wr_verdict;

/* The backoff: the n-th retry (from 1) waits the n-th step, the last step
 * once they run out. Few distinct steps keep the delay queues few. */
extern const long wr_backoff_ms[];
extern const size_t wr_backoff_steps;

/* Decides for a message whose job failed as failure, that was retried
 * `retries` times already (its x-warren-retries header; the redelivered flag
 * plays no part: a redelivery after an outage is not a failure). */
wr_verdict wr_policy_decide(wr_on_error policy, wr_failure failure, long retries, long max);

/* Writes what the verdict does, for a log line: "failed: retry in 5 s as
 * attempt 2 of 5", "timed out: reject, 5 of 5 retries used", ... */
void wr_verdict_describe(const wr_verdict *v, char *buf, size_t len);

/* Parses "retry", "requeue" or "reject". Returns 0, or -1 for anything else. */
int wr_on_error_parse(const char *name, wr_on_error *out);

#endif
