/* The metrics text without a server: histograms are cumulative, label
 * values are escaped, and every family is declared before its samples. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "warren/stats.h"

static void histograms_are_cumulative(void) {
    wr_stats s;
    wr_stats_init(&s);
    wr_hist_observe(&s.job_duration, 0.003);
    wr_hist_observe(&s.job_duration, 0.2);
    wr_hist_observe(&s.job_duration, 0.2);
    wr_hist_observe(&s.job_duration, 1e6);
    wr_gauges g = {.queue = "q"};
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
}

static void labels_are_escaped(void) {
    wr_stats s;
    wr_stats_init(&s);
    s.jobs[WR_STAT_RETRY] = 7;
    wr_gauges g = {.queue = "a\"b\\c\nd", .in_flight = 2};
    size_t len;
    char *text = wr_stats_render(&s, &g, &len);
    CHECK(text != NULL);
    if (!text) return;
    CHECK(strstr(text, "warren_jobs_total{queue=\"a\\\"b\\\\c\\nd\",outcome=\"retry\"} 7\n"));
    CHECK(strstr(text, "warren_jobs_in_flight{queue=\"a\\\"b\\\\c\\nd\"} 2\n"));
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
}

int main(void) {
    histograms_are_cumulative();
    labels_are_escaped();
    return REPORT("stats_test");
}
