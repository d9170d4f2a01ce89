/* Command line and environment into one validated configuration. */
#ifndef WARREN_CONFIG_H
#define WARREN_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "warren/log.h"
#include "warren/policy.h"

/* Exit codes, from sysexits.h. */
enum {
    WR_EXIT_OK = 0,           /* clean drain */
    WR_EXIT_USAGE = 64,       /* bad command line or environment */
    WR_EXIT_UNAVAILABLE = 69, /* broker unreachable at start, or the queue is missing */
    WR_EXIT_TEMPFAIL = 75,    /* forced exit: unfinished jobs handed back */
    WR_EXIT_PROTOCOL = 76,    /* TLS: the broker's certificate is not trusted, or no TLS there */
    WR_EXIT_NOPERM = 77,      /* the broker refused the credentials or the vhost */
    WR_EXIT_CONFIG = 78,      /* the script does not load or has no handle */
};

typedef enum {
    WR_CMD_RUN,     /* warren [OPTIONS] SCRIPT */
    WR_CMD_CHECK,   /* warren check SCRIPT */
    WR_CMD_TRY,     /* warren try SCRIPT [BODY...] */
    WR_CMD_HELP,    /* --help */
    WR_CMD_VERSION, /* --version */
} wr_command;

/* One queue a worker consumes, with its own prefetch. */
typedef struct wr_queue_conf {
    char *name;
    int prefetch; /* its jobs in flight at most */
} wr_queue_conf;

typedef struct wr_config {
    wr_command command;
    char **urls; /* one or more broker URLs, tried in order */
    size_t nurls;
    wr_queue_conf
        *queues; /* -q NAME[:PREFETCH], in the order given; none in check/try without -q */
    size_t nqueues;
    int prefetch;           /* --prefetch: a queue's when it names none */
    double drain_timeout;   /* seconds */
    int heartbeat;          /* whole seconds, 0 disables */
    double connect_timeout; /* seconds to keep trying at start-up, 0 = forever */
    int max_retries;        /* retries (warren.retry and the failure policy) before a reject */
    wr_on_error on_error;   /* what a failed job's message becomes */
    double job_timeout;     /* seconds a job may run before it fails, 0 = no limit */
    int memory_limit;       /* MiB each script version's Lua state may hold, 0 = no limit */
    const char *tls_ca;     /* --tls-ca: the CAs to trust instead of the system's, or NULL */
    const char *tls_cert;   /* --tls-cert and --tls-key: the client certificate, or NULL */
    const char *tls_key;
    bool declare;
    bool watch;            /* reload when the script changes */
    long max_jobs;         /* --max-jobs: start at most this many jobs, then drain; 0 = no limit */
    bool until_empty;      /* --until-empty: exit once the queue is empty, nothing in flight */
    const char *report;    /* --report: a JSON line per job to this file ("-": stdout), or NULL */
    bool virtual_time;     /* try --virtual-time: sleeps end at once, on a virtual clock */
    const char *fixtures;  /* try --message/--messages: the file of messages, or NULL */
    bool fixture_lines;    /* --messages: JSON lines; --message: one JSON object */
    int metrics_port;      /* --metrics: 0 = no metrics server */
    char metrics_host[64]; /* its numeric address; "" = every interface */
    wr_log_level log_level;
    wr_log_format log_format;
    const char *script;
    char **bodies; /* try: bodies from the command line (argv memory) */
    int nbodies;
    char **positional; /* owned array behind bodies */
} wr_config;

/* Fills c from argv and WARREN_* environment variables (a flag wins over its
 * variable). Returns 0, or -1 with a one-line message in err; c must then
 * still be released with wr_config_free. */
int wr_config_parse(wr_config *c, int argc, char **argv, char *err, size_t errlen);

void wr_config_free(wr_config *c);

/* The --help text. */
extern const char wr_usage[];

#endif
