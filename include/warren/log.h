/* Leveled logging to stderr, one line per event. */
#ifndef WARREN_LOG_H
#define WARREN_LOG_H

#include <stdarg.h>

typedef enum { WR_LOG_DEBUG, WR_LOG_INFO, WR_LOG_WARN, WR_LOG_ERROR } wr_log_level;

/* Parses "debug", "info", "warn" or "error". Returns 0, or -1 for anything else. */
int wr_log_parse_level(const char *name, wr_log_level *out);

/* Messages below the level are dropped. The default is WR_LOG_INFO. */
void wr_log_set_level(wr_log_level level);
int wr_log_enabled(wr_log_level level);

/* Writes "TIME LEVEL message" as one line; never fails visibly. */
void wr_log(wr_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void wr_logv(wr_log_level level, const char *fmt, va_list ap);

#define wr_debug(...) wr_log(WR_LOG_DEBUG, __VA_ARGS__)
#define wr_info(...) wr_log(WR_LOG_INFO, __VA_ARGS__)
#define wr_warn(...) wr_log(WR_LOG_WARN, __VA_ARGS__)
#define wr_error(...) wr_log(WR_LOG_ERROR, __VA_ARGS__)

#endif
