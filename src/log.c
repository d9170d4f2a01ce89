#include "warren/log.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static wr_log_level threshold = WR_LOG_INFO;
static wr_log_format format = WR_LOG_TEXT;
static bool journal; /* stderr is the journal's stream */
static const char *const names[] = {"debug", "info", "warn", "error"};
static const char *const formats[] = {"text", "logfmt", "json"};
/* syslog priorities of the levels, for the journal. */
static const int priorities[] = {7, 6, 4, 3};

int wr_log_parse_level(const char *name, wr_log_level *out) {
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, names[i]) == 0) {
            *out = (wr_log_level)i;
            return 0;
        }
    }
    return -1;
}

int wr_log_parse_format(const char *name, wr_log_format *out) {
    for (int i = 0; i < 3; i++) {
        if (strcmp(name, formats[i]) == 0) {
            *out = (wr_log_format)i;
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

/* JOURNAL_STREAM is "DEVICE:INODE" of the stream systemd connected; it only
 * counts while stderr is still that stream (not redirected since). */
static bool stderr_is_journal(void) {
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(2, &st) != 0) return false;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void wr_log_set_format(wr_log_format f) {
    format = f;
    journal = stderr_is_journal();
}

/* A line being built in buf; what does not fit is cut, leaving room for
 * the line's end. */
typedef struct line {
    char *buf;
    size_t len, cap;
} line;

static void add(line *l, const char *s, size_t n) {
    size_t room = l->cap - 2 - l->len;
    /* An escape or a character is written whole or not at all. */
    if (n > room) n = n <= 6 ? 0 : room;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void adds(line *l, const char *s) {
    add(l, s, strlen(s));
}

static void addf(line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void addf(line *l, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) add(l, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* The length of the valid UTF-8 sequence at s (at most n bytes), or 0. */
static size_t utf8_length(const unsigned char *s, size_t n) {
    size_t want = s[0] < 0x80             ? 1
                  : (s[0] & 0xe0) == 0xc0 ? 2
                  : (s[0] & 0xf0) == 0xe0 ? 3
                  : (s[0] & 0xf8) == 0xf0 ? 4
                                          : 0;
    if (want == 0 || want > n || (want == 2 && s[0] < 0xc2)) return 0;
    for (size_t i = 1; i < want; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    return want;
}

/* Adds s (n bytes) escaped: control characters as \n, \t, \r or \u00XX (in
 * JSON) / \xXX, backslash always, and quote when quoted. In JSON a byte that
 * is not valid UTF-8 becomes U+FFFD. */
static void add_escaped(line *l, const char *s, size_t n, bool quoted, bool json) {
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n')
            adds(l, "\\n");
        else if (c == '\t')
            adds(l, "\\t");
        else if (c == '\r')
            adds(l, "\\r");
        else if (c == '\\' || (quoted && c == '"'))
            addf(l, "\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            addf(l, json ? "\\u%04x" : "\\x%02x", c);
        else if (json && c >= 0x80) {
            size_t k = utf8_length((const unsigned char *)s + i, n - i);
            if (k == 0) {
                adds(l, "\\ufffd");
                i++;
                continue;
            }
            add(l, s + i, k);
            i += k;
            continue;
        } else
            add(l, s + i, 1);
        i++;
    }
}

/* key=value for logfmt, quoted when it has to be. */
static void add_pair(line *l, const char *key, const char *v, size_t n) {
    bool quote = n == 0;
    for (size_t i = 0; i < n && !quote; i++)
        quote = v[i] == ' ' || v[i] == '=' || v[i] == '"' || (unsigned char)v[i] < 0x20;
    addf(l, " %s=", key);
    if (quote) adds(l, "\"");
    add_escaped(l, v, n, quote, false);
    if (quote) adds(l, "\"");
}

/* "key":"value" for JSON, after a comma. */
static void add_member(line *l, const char *key, const char *v, size_t n) {
    addf(l, ",\"%s\":\"", key);
    add_escaped(l, v, n, true, true);
    adds(l, "\"");
}

static void emit(wr_log_level level, const wr_log_job *job, const char *fmt, va_list ap) {
    if (level < threshold) return;
    char msg[6144];
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    size_t msglen = m < 0 ? 0 : (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1;
    struct timespec ts;
    struct tm tm;
    char stamp[40];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t sl = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + sl, sizeof stamp - sl, ".%03ldZ", ts.tv_nsec / 1000000L);
    /* One write per record, so lines from a log-heavy job never interleave. */
    char buf[40 * 1024]; /* the longest message, every byte escaped to six */
    line l = {buf, 0, sizeof buf};
    if (format == WR_LOG_TEXT) {
        if (journal)
            addf(&l, "<%d>%-5s ", priorities[level], names[level]);
        else
            addf(&l, "%s %-5s ", stamp, names[level]);
        if (job && job->script) { /* a script's own line: "[ID] " or "[tag N] " */
            adds(&l, "[");
            if (job->idlen)
                add_escaped(&l, job->id, job->idlen, false, false);
            else
                addf(&l, "tag %llu", job->tag);
            adds(&l, "] ");
        } else if (job) {
            adds(&l, "job ");
            add_escaped(&l, job->id, job->idlen, false, false);
            addf(&l, "%s(tag %llu) ", job->idlen ? " " : "", job->tag);
        }
        add_escaped(&l, msg, msglen, false, false);
    } else if (format == WR_LOG_LOGFMT) {
        addf(&l, "time=%s level=%s", stamp, names[level]);
        add_pair(&l, "msg", msg, msglen);
        if (job) {
            if (job->queue) add_pair(&l, "queue", job->queue, strlen(job->queue));
            if (job->idlen) add_pair(&l, "id", job->id, job->idlen);
            addf(&l, " tag=%llu", job->tag);
            if (job->version) addf(&l, " version=%u", job->version);
        }
    } else {
        addf(&l, "{\"time\":\"%s\",\"level\":\"%s\"", stamp, names[level]);
        add_member(&l, "msg", msg, msglen);
        if (job) {
            if (job->queue) add_member(&l, "queue", job->queue, strlen(job->queue));
            if (job->idlen) add_member(&l, "id", job->id, job->idlen);
            addf(&l, ",\"tag\":%llu", job->tag);
            if (job->version) addf(&l, ",\"version\":%u", job->version);
        }
        adds(&l, "}");
    }
    l.buf[l.len++] = '\n';
    fwrite(l.buf, 1, l.len, stderr);
}

void wr_log(wr_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    emit(level, NULL, fmt, ap);
    va_end(ap);
}

void wr_log_for(wr_log_level level, const wr_log_job *job, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    emit(level, job, fmt, ap);
    va_end(ap);
}

size_t wr_json_string(char *out, size_t cap, const char *s, size_t n) {
    line l = {out, 0, cap - 1}; /* room for the closing quote */
    adds(&l, "\"");
    add_escaped(&l, s, n, true, true);
    out[l.len++] = '"';
    out[l.len] = '\0';
    return l.len;
}
