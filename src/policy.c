#include "warren/policy.h"

#include <stdio.h>
#include <string.h>

/* 1 s, 5 s, 30 s, 2 min, then 10 min for every later retry. */
const long wr_backoff_ms[] = {1000, 5000, 30000, 120000, 600000};
const size_t wr_backoff_steps = sizeof wr_backoff_ms / sizeof *wr_backoff_ms;

wr_verdict wr_policy_decide(wr_on_error policy, wr_failure failure, long retries, long max) {
    if (retries < 0) retries = 0;
    wr_verdict v = {.failure = failure, .policy = policy, .attempt = retries, .max = max};
    switch (policy) {
    case WR_ON_ERROR_REQUEUE:
        v.action = WR_VERDICT_REQUEUE;
        break;
    case WR_ON_ERROR_REJECT:
        v.action = WR_VERDICT_REJECT;
        break;
    case WR_ON_ERROR_RETRY:
        if (retries >= max) {
            v.action = WR_VERDICT_REJECT;
            break;
        }
        v.action = WR_VERDICT_RETRY;
        v.attempt = retries + 1;
        size_t step = (size_t)retries < wr_backoff_steps ? (size_t)retries : wr_backoff_steps - 1;
        v.delay_ms = wr_backoff_ms[step];
        break;
    }
    return v;
}

static const char *failure_name(wr_failure f) {
    switch (f) {
    case WR_FAIL_MEMORY:
        return "ran out of memory";
    case WR_FAIL_TIMEOUT:
        return "timed out";
    default:
        return "failed";
    }
}

void wr_verdict_describe(const wr_verdict *v, char *buf, size_t len) {
    const char *what = failure_name(v->failure);
    switch (v->action) {
    case WR_VERDICT_RETRY:
        snprintf(buf, len, "%s: retry in %g s as attempt %ld of %ld", what,
                 (double)v->delay_ms / 1000, v->attempt, v->max);
        break;
    case WR_VERDICT_REQUEUE:
        snprintf(buf, len, "%s: requeue at once (--on-error requeue)", what);
        break;
    case WR_VERDICT_REJECT:
        if (v->policy == WR_ON_ERROR_REJECT)
            snprintf(buf, len, "%s: reject (--on-error reject)", what);
        else
            snprintf(buf, len, "%s: reject, %ld of %ld retries used", what, v->attempt, v->max);
        break;
    }
}

int wr_on_error_parse(const char *name, wr_on_error *out) {
    static const char *const names[] = {"retry", "requeue", "reject"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(name, names[i])) {
            *out = (wr_on_error)i;
            return 0;
        }
    return -1;
}
