/* The metrics text without a server: histograms are cumulative, label
 * values are escaped, every family is declared before its samples, and
 * each queue has its own samples, grouped under one family. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "warren/stats.h"

static void histograms_are_cumulative(void) {
    wr_stats s;
    const char *names[] = {"q"};
    CHECK(wr_stats_init(&s, names, 1) == 0);
    wr_hist *h = &s.queues[0].job_duration;
    wr_hist_observe(h, 0.003);
    wr_hist_observe(h, 0.2);
    wr_hist_observe(h, 0.2);
    wr_hist_observe(h, 1e6);
    wr_gauges g = {0};
    size_t len;
    char *text = wr_stats_render(&s, &g, &len);
    CHECK(text && strlen(text) == len);
    if (!text) return;
    CHECK(strstr(text, "warren_job_duration_seconds_bucket{queue=\"q\",le=\"0.005\"} 1\n"));
    CHECK(strstr(text, "warren_job_duration_seconds_bucket{queue=\"q\",le=\"0.1\"} 1\n"));
    CHECK(strstr(text, "warren_job_duration_seconds_bucket{queue=\"q\",le=\"0.25\"} 3\n"));
    CHECK(strstr(text, "warren_job_duration_seconds_bucket{queue=\"q\",le=\"1500\"} 3\n"));
    CHECK(strstr(text, "warren_job_duration_seconds_bucket{queue=\"q\",le=\"+Inf\"} 4\n"));
    CHECK(strstr(text, "warren_job_duration_seconds_count{queue=\"q\"} 4\n"));
    CHECK(strstr(text, "warren_loop_lag_seconds_bucket{le=\"+Inf\"} 0\n"));
    CHECK(strstr(text, "warren_loop_lag_seconds_sum 0.000000\n"));
    free(text);
    wr_stats_free(&s);
}

static void labels_are_escaped(void) {
    wr_stats s;
    const char *names[] = {"a\"b\\c\nd", "mail"};
    CHECK(wr_stats_init(&s, names, 2) == 0);
    s.queues[0].jobs[WR_STAT_RETRY] = 7;
    s.queues[0].in_flight = 2;
    s.queues[1].jobs[WR_STAT_ACK] = 3;
    wr_gauges g = {0};
    size_t len;
    char *text = wr_stats_render(&s, &g, &len);
    CHECK(text != NULL);
    if (!text) return;
    CHECK(strstr(text, "warren_jobs_total{queue=\"a\\\"b\\\\c\\nd\",outcome=\"retry\"} 7\n"));
    CHECK(strstr(text, "warren_jobs_in_flight{queue=\"a\\\"b\\\\c\\nd\"} 2\n"));
    CHECK(strstr(text, "warren_jobs_total{queue=\"mail\",outcome=\"ack\"} 3\n"));
    CHECK(strstr(text, "warren_jobs_in_flight{queue=\"mail\"} 0\n"));
    /* The samples of a family are together: one TYPE line each. */
    const char *type = strstr(text, "# TYPE warren_jobs_in_flight ");
    CHECK(type && !strstr(type + 1, "# TYPE warren_jobs_in_flight "));
    /* Each sample's family was declared with HELP and TYPE first. */
    for (char *line = text; *line; line = strchr(line, '\n') + 1) {
        if (*line == '#') continue;
        size_t n = strcspn(line, "{ ");
        char family[128];
        snprintf(family, sizeof family, "# TYPE %.*s ", (int)n, line);
        char *suffix = strstr(family, "_bucket ");
        if (!suffix) suffix = strstr(family, "_sum ");
        if (!suffix) suffix = strstr(family, "_count ");
        if (suffix && strncmp(family + 7, "warren_", 7) == 0 && strstr(family, "seconds"))
            strcpy(suffix, " ");
        char *decl = strstr(text, family);
        CHECK(decl != NULL && decl < line);
        if (!decl || decl > line) fprintf(stderr, "undeclared: %.*s\n", (int)n, line);
    }
    free(text);
    wr_stats_free(&s);
}

int main(void) {
    histograms_are_cumulative();
    labels_are_escaped();
    return REPORT("stats_test");
}
