/* --report: one JSON line per job that ended, for scripted runs and test
 * suites: queue, message_id, delivery_tag, outcome, redelivered, retries,
 * duration_s, version and error. Written to a file (appended to) or to
 * standard output ("-"), flushed line by line. Nothing of it is on the loop
 * beyond a buffered write per job. */
#ifndef WARREN_REPORT_H
#define WARREN_REPORT_H

#include <stdbool.h>
#include <stddef.h>

typedef struct wr_report wr_report;

typedef struct wr_report_line {
    const char *queue;
    const char *message_id; /* id_len bytes; null in the line when id_len is 0 */
    size_t id_len;
    unsigned long long delivery_tag;
    const char *outcome; /* ack, requeue, reject, retry, interrupted */
    bool redelivered;
    long retries;
    double duration_s;
    unsigned version;
    const char *error; /* NULL: null in the line */
} wr_report_line;

/* Opens path for appending ("-": standard output). Returns NULL with a
 * one-line reason in err. */
wr_report *wr_report_open(const char *path, char *err, size_t errlen);

/* Writes one line; a failed write is logged once. */
void wr_report_job(wr_report *r, const wr_report_line *l);

void wr_report_close(wr_report *r);

#endif
