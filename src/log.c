#include "warren/log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static wr_log_level threshold = WR_LOG_INFO;
static const char *const names[] = {"debug", "info", "warn", "error"};

int wr_log_parse_level(const char *name, wr_log_level *out) {
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, names[i]) == 0) {
            *out = (wr_log_level)i;
            return 0;
        }
    }
    return -1;
}

void wr_log_set_level(wr_log_level level) {
    threshold = level;
}

int wr_log_enabled(wr_log_level level) {
    return level >= threshold;
}

void wr_logv(wr_log_level level, const char *fmt, va_list ap) {
    if (level < threshold) return;
    struct timespec ts;
    struct tm tm;
    char stamp[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    /* One buffered line per event so lines from a log-heavy job never interleave. */
    char line[4096];
    int n =
        snprintf(line, sizeof line, "%s.%03ldZ %-5s ", stamp, ts.tv_nsec / 1000000L, names[level]);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2) len = sizeof line - 2;
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);
}

void wr_log(wr_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    wr_logv(level, fmt, ap);
    va_end(ap);
}
