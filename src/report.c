#include "warren/report.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "warren/log.h"

struct wr_report {
    FILE *f;
    bool owned; /* opened here, closed here */
    bool failed;
};

wr_report *wr_report_open(const char *path, char *err, size_t errlen) {
    wr_report *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (strcmp(path, "-") == 0) {
        r->f = stdout;
    } else if ((r->f = fopen(path, "a"))) {
        r->owned = true;
    } else {
        snprintf(err, errlen, "--report: cannot open %s: %s", path, strerror(errno));
        free(r);
        return NULL;
    }
    return r;
}

void wr_report_job(wr_report *r, const wr_report_line *l) {
    char queue[1100], id[1600], error[24 * 1024];
    wr_json_string(queue, sizeof queue, l->queue, strlen(l->queue));
    if (l->id_len)
        wr_json_string(id, sizeof id, l->message_id, l->id_len);
    else
        strcpy(id, "null");
    if (l->error)
        wr_json_string(error, sizeof error, l->error, strlen(l->error));
    else
        strcpy(error, "null");
    int n = fprintf(r->f,
                    "{\"queue\":%s,\"message_id\":%s,\"delivery_tag\":%llu,\"outcome\":\"%s\","
                    "\"redelivered\":%s,\"retries\":%ld,\"duration_s\":%.6f,\"version\":%u,"
                    "\"error\":%s}\n",
                    queue, id, l->delivery_tag, l->outcome, l->redelivered ? "true" : "false",
                    l->retries, l->duration_s, l->version, error);
    if ((n < 0 || fflush(r->f) != 0) && !r->failed) {
        r->failed = true;
        wr_error("--report: cannot write: %s", strerror(errno));
    }
}

void wr_report_close(wr_report *r) {
    if (!r) return;
    if (r->owned) fclose(r->f);
    free(r);
}
