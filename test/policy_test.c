/* The failure policy without a broker: which action, which delay, which
 * attempt, and the words the log says it with. */
#include <string.h>

#include "check.h"
#include "warren/policy.h"

static int says(const wr_verdict *v, const char *want) {
    char buf[128];
    wr_verdict_describe(v, buf, sizeof buf);
    if (strcmp(buf, want) == 0) return 1;
    fprintf(stderr, "said \"%s\", wanted \"%s\"\n", buf, want);
    return 0;
}

static void retries_with_backoff_then_rejects(void) {
    const long want_ms[] = {1000, 5000, 30000, 120000, 600000, 600000, 600000};
    for (long retries = 0; retries < 7; retries++) {
        wr_verdict v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_ERROR, retries, 7);
        CHECK(v.action == WR_VERDICT_RETRY);
        CHECK(v.attempt == retries + 1);
        CHECK(v.delay_ms == want_ms[retries]);
    }
    wr_verdict v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_ERROR, 0, 5);
    CHECK(says(&v, "failed: retry in 1 s as attempt 1 of 5"));
    v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_TIMEOUT, 3, 5);
    CHECK(says(&v, "timed out: retry in 120 s as attempt 4 of 5"));
    v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_MEMORY, 5, 5);
    CHECK(v.action == WR_VERDICT_REJECT);
    CHECK(says(&v, "ran out of memory: reject, 5 of 5 retries used"));
    /* A count past the maximum (lowered since), or none allowed at all. */
    v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_ERROR, 9, 2);
    CHECK(v.action == WR_VERDICT_REJECT);
    v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_ERROR, 0, 0);
    CHECK(v.action == WR_VERDICT_REJECT);
    CHECK(says(&v, "failed: reject, 0 of 0 retries used"));
    /* A bogus negative header counts as none. */
    v = wr_policy_decide(WR_ON_ERROR_RETRY, WR_FAIL_ERROR, -4, 2);
    CHECK(v.action == WR_VERDICT_RETRY && v.attempt == 1 && v.delay_ms == 1000);
}

static void requeue_and_reject_ignore_the_count(void) {
    for (long retries = 0; retries < 10; retries += 9) {
        wr_verdict v = wr_policy_decide(WR_ON_ERROR_REQUEUE, WR_FAIL_TIMEOUT, retries, 5);
        CHECK(v.action == WR_VERDICT_REQUEUE);
        CHECK(says(&v, "timed out: requeue at once (--on-error requeue)"));
        v = wr_policy_decide(WR_ON_ERROR_REJECT, WR_FAIL_ERROR, retries, 5);
        CHECK(v.action == WR_VERDICT_REJECT);
        CHECK(says(&v, "failed: reject (--on-error reject)"));
    }
}

static void parses_the_policy_names(void) {
    wr_on_error p = WR_ON_ERROR_REJECT;
    CHECK(wr_on_error_parse("retry", &p) == 0 && p == WR_ON_ERROR_RETRY);
    CHECK(wr_on_error_parse("requeue", &p) == 0 && p == WR_ON_ERROR_REQUEUE);
    CHECK(wr_on_error_parse("reject", &p) == 0 && p == WR_ON_ERROR_REJECT);
    CHECK(wr_on_error_parse("Retry", &p) == -1);
    CHECK(wr_on_error_parse("", &p) == -1);
}

int main(void) {
    retries_with_backoff_then_rejects();
    requeue_and_reject_ignore_the_count();
    parses_the_policy_names();
    return REPORT("policy_test");
}
