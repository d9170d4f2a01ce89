/* Leveled logging to stderr, exactly one line per record whatever the
 * message holds (tracebacks, a program's output): newlines and other
 * control characters are escaped. Three formats:
 *
 *   text    2026-11-25T10:00:00.000Z info  job img-42 (tag 7) acked ...
 *           or, when stderr is the journal (JOURNAL_STREAM names it), with a
 *           <N> priority prefix instead of the timestamp, which the journal
 *           keeps itself
 *   logfmt  time=... level=info msg="acked ..." queue=img id=img-42 tag=7 version=1
 *   json    {"time":"...","level":"info","msg":"acked ...","queue":"img",...}
 *
 * Records of a job carry its queue, message id, delivery tag and script
 * version as fields (in text, as the "job ID (tag N)" prefix, or "[ID]" on
 * the script's own lines). */
#ifndef WARREN_LOG_H
#define WARREN_LOG_H

#include <stdarg.h>
#include <stddef.h>

typedef enum { WR_LOG_DEBUG, WR_LOG_INFO, WR_LOG_WARN, WR_LOG_ERROR } wr_log_level;

typedef enum { WR_LOG_TEXT, WR_LOG_LOGFMT, WR_LOG_JSON } wr_log_format;

/* Parses "debug", "info", "warn" or "error". Returns 0, or -1 for anything else. */
int wr_log_parse_level(const char *name, wr_log_level *out);

/* Parses "text", "logfmt" or "json". Returns 0, or -1 for anything else. */
int wr_log_parse_format(const char *name, wr_log_format *out);

/* Messages below the level are dropped. The default is WR_LOG_INFO. */
void wr_log_set_level(wr_log_level level);
int wr_log_enabled(wr_log_level level);

/* Chooses the format (the default is text) and looks whether stderr is the
 * journal's stream. */
void wr_log_set_format(wr_log_format format);

/* The fields of a job's records. */
typedef struct wr_log_job {
    const char *queue; /* NULL: not known */
    const char *id;    /* the message id, idlen bytes; none when idlen is 0 */
    size_t idlen;
    unsigned long long tag;
    unsigned version; /* 0: not known */
    int script;       /* logged by the script (warren.log): "[ID] " in text */
} wr_log_job;

/* Writes one record; never fails visibly. */
void wr_log(wr_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void wr_log_for(wr_log_level level, const wr_log_job *job, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Writes s (n bytes) into out as a JSON string, quotes included, escaped as
 * in the json format; cut to fit cap (at least 8). Returns its length. */
size_t wr_json_string(char *out, size_t cap, const char *s, size_t n);

/* "s" unless n is 1: "%zu job%s", n, wr_plural(n). */
static inline const char *wr_plural(unsigned long long n) {
    return n == 1 ? "" : "s";
}

#define wr_debug(...) wr_log(WR_LOG_DEBUG, __VA_ARGS__)
#define wr_info(...) wr_log(WR_LOG_INFO, __VA_ARGS__)
#define wr_warn(...) wr_log(WR_LOG_WARN, __VA_ARGS__)
#define wr_error(...) wr_log(WR_LOG_ERROR, __VA_ARGS__)

#endif
