#include "warren/config.h"

#include <amqp.h>
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "warren/url.h"

const char wr_usage[] =
    "usage: warren [OPTIONS] SCRIPT.lua     run the worker\n"
    "       warren check SCRIPT.lua         load the script and report errors\n"
    "       warren try SCRIPT.lua [BODY..]  run handle() on each BODY (or stdin line), no broker\n"
    "       warren --help | --version\n"
    "\n"
    "options (each also read from WARREN_<NAME>, e.g. WARREN_DRAIN_TIMEOUT; a flag wins):\n"
    "  -u, --url URL              broker, amqp:// or amqps://; repeat or separate with commas\n"
    "                             to list cluster nodes (default "
    "amqp://guest:guest@localhost:5672/)\n"
    "      --url-file FILE        read the URLs from FILE (one per line or comma-separated),\n"
    "                             so no password shows in ps; also the credential 'url'\n"
    "                             of $CREDENTIALS_DIRECTORY\n"
    "      --password-file FILE   the broker password, from FILE (or the credential\n"
    "                             'password'), for every URL\n"
    "      --tls-ca FILE          amqps: trust the CAs in FILE (PEM) instead of the system's\n"
    "      --tls-cert FILE        amqps: present this client certificate (PEM); with no\n"
    "                             password in the URL it is the login (SASL EXTERNAL)\n"
    "      --tls-key FILE         the client certificate's private key (PEM)\n"
    "  -q, --queue NAME[:N]       queue to consume (required), with at most N of its jobs in\n"
    "                             flight; repeat or separate with commas for several queues\n"
    "  -p, --prefetch N           most jobs in flight at once per queue without its own N\n"
    "                             (default 1)\n"
    "  -t, --drain-timeout SECS   time in-flight jobs get after the first signal (default 5)\n"
    "      --heartbeat SECS       AMQP heartbeat in whole seconds, 0 disables (default 10)\n"
    "      --connect-timeout SECS keep trying to reach the broker at start-up (default 30,\n"
    "                             0 = forever)\n"
    "      --declare              declare the queues (durable) if they are missing\n"
    "      --on-error POLICY      what a failed job's message becomes: retry (a delayed copy,\n"
    "                             1 s, 5 s, 30 s, 2 min, then 10 min), requeue or reject\n"
    "                             (default retry)\n"
    "      --max-retries N        reject a message retried this often (default 5)\n"
    "      --job-timeout SECS     a job running longer fails (default 1500, below the broker's\n"
    "                             consumer_timeout of 30 min; 0 = no limit)\n"
    "      --memory-limit MB      memory each script version's Lua state may hold; an\n"
    "                             allocation past it fails its job (default 0 = no limit)\n"
    "      --no-watch             do not reload the script when its files change\n"
    "      --max-jobs N           start at most N jobs, then drain and exit 0\n"
    "      --until-empty          drain and exit 0 once every queue is empty and nothing is\n"
    "                             in flight\n"
    "      --report FILE          append one JSON line per job that ended to FILE (- for\n"
    "                             standard output)\n"
    "      --virtual-time         try: sleeps end at once, advancing a virtual clock that\n"
    "                             --job-timeout counts\n"
    "      --message FILE         try: the message in FILE (JSON: body or body_base64,\n"
    "                             headers, properties, routing_key, exchange, redelivered)\n"
    "      --messages FILE        try: one such message per line of FILE\n"
    "      --log-level LEVEL      debug, info, warn or error (default info)\n"
    "      --log-format FORMAT    text, logfmt or json, one record per line (default text)\n"
    "      --metrics [HOST:]PORT  serve /metrics (Prometheus) and /healthz over HTTP on PORT\n"
    "                             (every interface, or the numeric HOST); default off\n"
    "\n"
    "exit codes:\n"
    "  0   clean drain: every job in flight finished (or nothing was in flight)\n"
    "  64  bad usage: an unknown option, a bad value, no queue, no script\n"
    "  69  broker unreachable at start (after --connect-timeout), the queue does not exist,\n"
    "      or the --metrics address cannot be listened on\n"
    "  75  forced exit: unfinished jobs were handed back to the broker; or the broker did\n"
    "      not confirm the final close\n"
    "  76  TLS: the broker's certificate is not trusted (unknown CA, wrong host name,\n"
    "      expired) or its port does not speak TLS\n"
    "  77  the broker refused the credentials, the client certificate or the vhost\n"
    "  78  the script does not load or has no handle\n"
    "warren try exits 0 when every body was acked, 1 otherwise, 75 when interrupted\n"
    "\n"
    "more in warren(1); the Lua API of scripts in warren-lua(7)\n";

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* Durations: a non-negative decimal number of seconds, fractions allowed. */
static int parse_seconds(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0 || !isfinite(v) || v < 0 ||
        !isdigit((unsigned char)*s))
        return -1;
    *out = v;
    return 0;
}

static int parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno != 0 || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static int parse_bool(const char *s, bool *out) {
    if (!strcmp(s, "1") || !strcmp(s, "true") || !strcmp(s, "yes") || !strcmp(s, "on")) {
        *out = true;
        return 0;
    }
    if (!strcmp(s, "0") || !strcmp(s, "false") || !strcmp(s, "no") || !strcmp(s, "off") || !*s) {
        *out = false;
        return 0;
    }
    return -1;
}

/* Splits a list of URLs (separated by commas or line ends) onto c->urls,
 * checking each; from names where it came from. Messages never show a
 * password, and show a bad URL only when show (not one read from a file,
 * which may hold anything). */
static int add_urls(wr_config *c, const char *list, const char *from, bool show, char *err,
                    size_t errlen) {
    const char *p = list;
    for (unsigned nth = 1;; nth++) {
        size_t n = strcspn(p, ",\n");
        while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\r' || p[n - 1] == '\t'))
            n--;
        while (n > 0 && (*p == ' ' || *p == '\t')) {
            p++;
            n--;
        }
        if (n > 0) {
            char *url = strndup(p, n);
            char *probe = strdup(url);
            struct amqp_connection_info info;
            int bad = !url || !probe || amqp_parse_url(probe, &info) != AMQP_STATUS_OK;
            free(probe);
            if (bad) {
                free(url);
                char shown[512];
                wr_url_redact(p, n, shown, sizeof shown);
                if (!show)
                    return fail(err, errlen,
                                "%s: URL %u is invalid: expected amqp://user:pass@host:port/vhost",
                                from, nth);
                return fail(err, errlen,
                            "%s: invalid URL '%s': expected amqp://user:pass@host:port/vhost", from,
                            shown);
            }
            char **grown = realloc(c->urls, (c->nurls + 1) * sizeof *grown);
            if (!grown) {
                free(url);
                return fail(err, errlen, "out of memory");
            }
            c->urls = grown;
            c->urls[c->nurls++] = url;
        }
        p += strcspn(p, ",\n");
        if (*p == '\0') return 0;
        p++;
    }
}

/* Reads a secret from path: at most 64 KiB, without trailing line ends and
 * blanks. Returns a malloc'd string, or NULL with a message in err. */
static char *read_secret(const char *path, const char *from, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail(err, errlen, "%s: cannot read %s: %s", from, path, strerror(errno));
        return NULL;
    }
    enum { MAX = 64 * 1024 };
    char *buf = malloc(MAX + 1);
    size_t n = buf ? fread(buf, 1, MAX + 1, f) : 0;
    bool failed = buf && ferror(f);
    fclose(f);
    if (!buf || failed || n > MAX || memchr(buf, '\0', n)) {
        fail(err, errlen, "%s: %s is %s", from, path,
             !buf      ? "too much for the memory left"
             : failed  ? "unreadable"
             : n > MAX ? "longer than 64 KiB"
                       : "not text");
        free(buf);
        return NULL;
    }
    while (n > 0 && strchr(" \t\r\n", buf[n - 1]))
        n--;
    buf[n] = '\0';
    return buf;
}

/* A file of the service manager's credentials ($CREDENTIALS_DIRECTORY), or
 * NULL when there is none by that name. */
static char *credential(const char *name, char *path, size_t len) {
    const char *dir = getenv("CREDENTIALS_DIRECTORY");
    if (!dir || !*dir) return NULL;
    snprintf(path, len, "%s/%s", dir, name);
    return access(path, F_OK) == 0 ? path : NULL;
}

/* The URLs from a file (--url-file, WARREN_URL_FILE, the credential url). */
static int add_url_file(wr_config *c, const char *path, const char *from, char *err,
                        size_t errlen) {
    char *text = read_secret(path, from, err, errlen);
    if (!text) return -1;
    char where[300];
    snprintf(where, sizeof where, "%s %s", from, path);
    int rc = add_urls(c, text, where, false, err, errlen);
    wr_url_wipe(text);
    free(text);
    return rc;
}

/* Sets the password of every URL to the one in path. */
static int set_password(wr_config *c, const char *path, const char *from, char *err,
                        size_t errlen) {
    char *password = read_secret(path, from, err, errlen);
    if (!password) return -1;
    int rc = 0;
    for (size_t i = 0; i < c->nurls && rc == 0; i++) {
        char *url = wr_url_with_password(c->urls[i], password);
        if (!url) {
            rc = fail(err, errlen, "out of memory");
            break;
        }
        wr_url_wipe(c->urls[i]);
        free(c->urls[i]);
        c->urls[i] = url;
    }
    memset(password, 0, strlen(password));
    free(password);
    return rc;
}

/* Splits a comma-separated list of NAME[:PREFETCH] onto c->queues. A
 * suffix of a colon and digits is the prefetch; 0 until --prefetch fills it
 * in (see wr_config_parse). */
static int add_queues(wr_config *c, const char *list, const char *from, char *err, size_t errlen) {
    const char *p = list;
    for (;;) {
        size_t n = strcspn(p, ",");
        size_t digits = 0; /* after the last colon */
        while (digits < n && isdigit((unsigned char)p[n - 1 - digits]))
            digits++;
        int prefetch = 0;
        size_t name_len = n;
        if (digits > 0 && digits < n && p[n - 1 - digits] == ':') {
            char num[8];
            snprintf(num, sizeof num, "%.*s", (int)(digits < 7 ? digits : 7), p + n - digits);
            if (digits > 6 || parse_int(num, 1, 65535, &prefetch))
                return fail(err, errlen,
                            "%s: '%.*s': the prefetch after ':' must be from 1 to 65535", from,
                            (int)n, p);
            name_len = n - digits - 1;
        }
        if (name_len == 0)
            return fail(err, errlen, "%s: a queue name is empty in '%s'", from, list);
        if (name_len > 255)
            return fail(err, errlen, "%s: a queue name is longer than 255 bytes", from);
        for (size_t i = 0; i < c->nqueues; i++)
            if (strlen(c->queues[i].name) == name_len && !memcmp(c->queues[i].name, p, name_len))
                return fail(err, errlen, "%s: queue '%.*s' given twice", from, (int)name_len, p);
        wr_queue_conf *grown = realloc(c->queues, (c->nqueues + 1) * sizeof *grown);
        if (!grown) return fail(err, errlen, "out of memory");
        c->queues = grown;
        if (!(c->queues[c->nqueues].name = strndup(p, name_len)))
            return fail(err, errlen, "out of memory");
        c->queues[c->nqueues++].prefetch = prefetch;
        if (p[n] == '\0') return 0;
        p += n + 1;
    }
}

enum opt_id {
    OPT_URL,
    OPT_QUEUE,
    OPT_PREFETCH,
    OPT_DRAIN_TIMEOUT,
    OPT_HEARTBEAT,
    OPT_CONNECT_TIMEOUT,
    OPT_DECLARE,
    OPT_MAX_RETRIES,
    OPT_ON_ERROR,
    OPT_JOB_TIMEOUT,
    OPT_MEMORY_LIMIT,
    OPT_NO_WATCH,
    OPT_LOG_LEVEL,
    OPT_METRICS,
    OPT_LOG_FORMAT,
    OPT_MAX_JOBS,
    OPT_UNTIL_EMPTY,
    OPT_REPORT,
    OPT_VIRTUAL_TIME,
    OPT_MESSAGE,
    OPT_MESSAGES,
    OPT_URL_FILE,
    OPT_PASSWORD_FILE,
    OPT_TLS_CA,
    OPT_TLS_CERT,
    OPT_TLS_KEY,
    OPT_COUNT
};

static const struct option_spec {
    char shortname;
    const char *name;
    const char *env;
    bool takes_value;
} options[OPT_COUNT] = {
    [OPT_URL] = {'u', "url", "WARREN_URL", true},
    [OPT_QUEUE] = {'q', "queue", "WARREN_QUEUE", true},
    [OPT_PREFETCH] = {'p', "prefetch", "WARREN_PREFETCH", true},
    [OPT_DRAIN_TIMEOUT] = {'t', "drain-timeout", "WARREN_DRAIN_TIMEOUT", true},
    [OPT_HEARTBEAT] = {0, "heartbeat", "WARREN_HEARTBEAT", true},
    [OPT_CONNECT_TIMEOUT] = {0, "connect-timeout", "WARREN_CONNECT_TIMEOUT", true},
    [OPT_DECLARE] = {0, "declare", "WARREN_DECLARE", false},
    [OPT_MAX_RETRIES] = {0, "max-retries", "WARREN_MAX_RETRIES", true},
    [OPT_ON_ERROR] = {0, "on-error", "WARREN_ON_ERROR", true},
    [OPT_JOB_TIMEOUT] = {0, "job-timeout", "WARREN_JOB_TIMEOUT", true},
    [OPT_MEMORY_LIMIT] = {0, "memory-limit", "WARREN_MEMORY_LIMIT", true},
    [OPT_NO_WATCH] = {0, "no-watch", "WARREN_NO_WATCH", false},
    [OPT_LOG_LEVEL] = {0, "log-level", "WARREN_LOG_LEVEL", true},
    [OPT_METRICS] = {0, "metrics", "WARREN_METRICS", true},
    [OPT_LOG_FORMAT] = {0, "log-format", "WARREN_LOG_FORMAT", true},
    [OPT_MAX_JOBS] = {0, "max-jobs", "WARREN_MAX_JOBS", true},
    [OPT_UNTIL_EMPTY] = {0, "until-empty", "WARREN_UNTIL_EMPTY", false},
    [OPT_REPORT] = {0, "report", "WARREN_REPORT", true},
    [OPT_VIRTUAL_TIME] = {0, "virtual-time", "WARREN_VIRTUAL_TIME", false},
    [OPT_MESSAGE] = {0, "message", "WARREN_MESSAGE", true},
    [OPT_MESSAGES] = {0, "messages", "WARREN_MESSAGES", true},
    [OPT_URL_FILE] = {0, "url-file", "WARREN_URL_FILE", true},
    [OPT_PASSWORD_FILE] = {0, "password-file", "WARREN_PASSWORD_FILE", true},
    [OPT_TLS_CA] = {0, "tls-ca", "WARREN_TLS_CA", true},
    [OPT_TLS_CERT] = {0, "tls-cert", "WARREN_TLS_CERT", true},
    [OPT_TLS_KEY] = {0, "tls-key", "WARREN_TLS_KEY", true},
};

/* [HOST:]PORT, HOST a numeric address ("[::1]" for IPv6) or localhost. */
static int parse_listen(wr_config *c, const char *v) {
    const char *colon = strrchr(v, ':');
    const char *port = colon ? colon + 1 : v;
    if (parse_int(port, 1, 65535, &c->metrics_port)) return -1;
    if (!colon) return 0;
    size_t n = (size_t)(colon - v);
    if (n >= 2 && v[0] == '[' && v[n - 1] == ']') {
        v++;
        n -= 2;
    }
    if (n == 9 && strncmp(v, "localhost", 9) == 0) {
        v = "127.0.0.1";
        n = 9;
    }
    if (n == 0 || n >= sizeof c->metrics_host) return -1;
    memcpy(c->metrics_host, v, n);
    c->metrics_host[n] = '\0';
    unsigned char addr[16];
    return inet_pton(AF_INET, c->metrics_host, addr) == 1 ||
                   inet_pton(AF_INET6, c->metrics_host, addr) == 1
               ? 0
               : -1;
}

/* Applies one option value; from names where it came from in messages. */
static int apply(wr_config *c, enum opt_id id, const char *v, const char *from, char *err,
                 size_t errlen) {
    switch (id) {
    case OPT_URL:
        return add_urls(c, v, from, true, err, errlen);
    case OPT_URL_FILE:
    case OPT_PASSWORD_FILE:
        return 0; /* with the URLs, in wr_config_parse */
    case OPT_TLS_CA:
    case OPT_TLS_CERT:
    case OPT_TLS_KEY:
        if (!*v) return fail(err, errlen, "%s: the file name is empty", from);
        *(id == OPT_TLS_CA ? &c->tls_ca : id == OPT_TLS_CERT ? &c->tls_cert : &c->tls_key) = v;
        return 0;
    case OPT_QUEUE:
        return add_queues(c, v, from, err, errlen);
    case OPT_PREFETCH:
        if (parse_int(v, 1, 65535, &c->prefetch))
            return fail(err, errlen, "%s: expected a whole number from 1 to 65535, got '%s'", from,
                        v);
        return 0;
    case OPT_DRAIN_TIMEOUT:
        if (parse_seconds(v, &c->drain_timeout))
            return fail(err, errlen, "%s: expected seconds (e.g. 5 or 0.5), got '%s'", from, v);
        return 0;
    case OPT_CONNECT_TIMEOUT:
        if (parse_seconds(v, &c->connect_timeout))
            return fail(err, errlen, "%s: expected seconds (e.g. 30, 0 = forever), got '%s'", from,
                        v);
        return 0;
    case OPT_HEARTBEAT:
        if (parse_int(v, 0, 65535, &c->heartbeat))
            return fail(err, errlen, "%s: expected whole seconds from 0 to 65535, got '%s'", from,
                        v);
        return 0;
    case OPT_MAX_RETRIES:
        if (parse_int(v, 0, 1000000, &c->max_retries))
            return fail(err, errlen, "%s: expected a whole number from 0, got '%s'", from, v);
        return 0;
    case OPT_ON_ERROR:
        if (wr_on_error_parse(v, &c->on_error))
            return fail(err, errlen, "%s: expected retry, requeue or reject, got '%s'", from, v);
        return 0;
    case OPT_JOB_TIMEOUT:
        if (parse_seconds(v, &c->job_timeout))
            return fail(err, errlen, "%s: expected seconds (e.g. 600, 0 = no limit), got '%s'",
                        from, v);
        return 0;
    case OPT_MEMORY_LIMIT:
        if (parse_int(v, 0, 1048576, &c->memory_limit))
            return fail(err, errlen, "%s: expected whole megabytes (0 = no limit), got '%s'", from,
                        v);
        return 0;
    case OPT_DECLARE:
        if (parse_bool(v, &c->declare))
            return fail(err, errlen, "%s: expected 1/0, true/false or yes/no, got '%s'", from, v);
        return 0;
    case OPT_NO_WATCH: {
        bool off;
        if (parse_bool(v, &off))
            return fail(err, errlen, "%s: expected 1/0, true/false or yes/no, got '%s'", from, v);
        c->watch = !off;
        return 0;
    }
    case OPT_LOG_LEVEL:
        if (wr_log_parse_level(v, &c->log_level))
            return fail(err, errlen, "%s: expected debug, info, warn or error, got '%s'", from, v);
        return 0;
    case OPT_MAX_JOBS: {
        int n;
        if (parse_int(v, 0, 2000000000, &n))
            return fail(err, errlen, "%s: expected a whole number of jobs (0 = no limit), got '%s'",
                        from, v);
        c->max_jobs = n;
        return 0;
    }
    case OPT_MESSAGE:
    case OPT_MESSAGES:
        if (!*v) return fail(err, errlen, "%s: expected a file name", from);
        if (c->fixtures)
            return fail(err, errlen, "%s: give one of --message and --messages, once", from);
        c->fixtures = v;
        c->fixture_lines = id == OPT_MESSAGES;
        return 0;
    case OPT_VIRTUAL_TIME:
        if (parse_bool(v, &c->virtual_time))
            return fail(err, errlen, "%s: expected 1/0, true/false or yes/no, got '%s'", from, v);
        return 0;
    case OPT_REPORT:
        if (!*v) return fail(err, errlen, "%s: expected a file name or -, got ''", from);
        c->report = v;
        return 0;
    case OPT_UNTIL_EMPTY:
        if (parse_bool(v, &c->until_empty))
            return fail(err, errlen, "%s: expected 1/0, true/false or yes/no, got '%s'", from, v);
        return 0;
    case OPT_LOG_FORMAT:
        if (wr_log_parse_format(v, &c->log_format))
            return fail(err, errlen, "%s: expected text, logfmt or json, got '%s'", from, v);
        return 0;
    case OPT_METRICS:
        if (parse_listen(c, v))
            return fail(err, errlen,
                        "%s: expected [HOST:]PORT with a numeric HOST (e.g. 9300, "
                        "127.0.0.1:9300 or [::1]:9300), got '%s'",
                        from, v);
        return 0;
    case OPT_COUNT:
        break;
    }
    return fail(err, errlen, "internal: unknown option");
}

static int find_long(const char *name, size_t len) {
    for (int i = 0; i < OPT_COUNT; i++)
        if (strlen(options[i].name) == len && !strncmp(options[i].name, name, len)) return i;
    return -1;
}

static int find_short(char ch) {
    for (int i = 0; i < OPT_COUNT; i++)
        if (options[i].shortname && options[i].shortname == ch) return i;
    return -1;
}

int wr_config_parse(wr_config *c, int argc, char **argv, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    c->command = WR_CMD_RUN;
    c->prefetch = 1;
    c->drain_timeout = 5;
    c->heartbeat = 10;
    c->connect_timeout = 30;
    c->max_retries = 5;
    c->on_error = WR_ON_ERROR_RETRY;
    /* Below RabbitMQ's default consumer_timeout (30 min): a job that runs
     * longer fails alone, before the broker closes the channel it came on
     * and with it every other job of the channel. */
    c->job_timeout = 1500;
    c->watch = true;
    c->log_level = WR_LOG_INFO;

    /* Flags are collected first so that the environment can be applied
     * underneath them: a flag wins over its variable. */
    const char *flag[OPT_COUNT] = {0};
    char **positional = calloc((size_t)argc + 1, sizeof *positional);
    if (!positional) return fail(err, errlen, "out of memory");
    int npos = 0, rc = -1;
    bool only_positional = false;
    char **urlflags = calloc((size_t)argc + 1, sizeof *urlflags);
    char **queueflags = calloc((size_t)argc + 1, sizeof *queueflags);
    int nurlflags = 0, nqueueflags = 0;
    if (!urlflags || !queueflags) {
        fail(err, errlen, "out of memory");
        goto out;
    }

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_positional || a[0] != '-' || a[1] == '\0') {
            positional[npos++] = argv[i];
            continue;
        }
        if (!strcmp(a, "--")) {
            only_positional = true;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            c->command = WR_CMD_HELP;
            rc = 0;
            goto out;
        }
        if (!strcmp(a, "--version") || !strcmp(a, "-V")) {
            c->command = WR_CMD_VERSION;
            rc = 0;
            goto out;
        }
        int id;
        const char *value = NULL;
        if (a[1] == '-') {
            const char *eq = strchr(a + 2, '=');
            size_t len = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
            id = find_long(a + 2, len);
            if (id < 0) {
                fail(err, errlen, "unknown option '%.*s' (see warren --help)", (int)(len + 2), a);
                goto out;
            }
            if (eq) value = eq + 1;
        } else {
            id = find_short(a[1]);
            if (id < 0) {
                fail(err, errlen, "unknown option '-%c' (see warren --help)", a[1]);
                goto out;
            }
            if (a[2]) value = a + 2;
        }
        if (options[id].takes_value) {
            if (!value) {
                if (i + 1 >= argc) {
                    fail(err, errlen, "option --%s needs a value", options[id].name);
                    goto out;
                }
                value = argv[++i];
            }
        } else if (value) {
            fail(err, errlen, "option --%s takes no value", options[id].name);
            goto out;
        } else {
            value = "1";
        }
        if (id == OPT_URL)
            urlflags[nurlflags++] = (char *)value;
        else if (id == OPT_QUEUE)
            queueflags[nqueueflags++] = (char *)value;
        else
            flag[id] = value;
    }

    char from[64];
    for (int id = 0; id < OPT_COUNT; id++) {
        const char *env = getenv(options[id].env);
        if (id == OPT_URL) { /* the first source of URLs there is */
            const char *file_env = getenv("WARREN_URL_FILE");
            char cred[4096];
            if (nurlflags > 0 && flag[OPT_URL_FILE]) {
                fail(err, errlen, "give --url or --url-file, not both");
                goto out;
            } else if (nurlflags > 0) {
                for (int k = 0; k < nurlflags; k++)
                    if (apply(c, OPT_URL, urlflags[k], "--url", err, errlen)) goto out;
            } else if (flag[OPT_URL_FILE]) {
                if (add_url_file(c, flag[OPT_URL_FILE], "--url-file", err, errlen)) goto out;
            } else if (env && *env) {
                if (apply(c, OPT_URL, env, options[id].env, err, errlen)) goto out;
            } else if (file_env && *file_env) {
                if (add_url_file(c, file_env, "WARREN_URL_FILE", err, errlen)) goto out;
            } else if (credential("url", cred, sizeof cred)) {
                if (add_url_file(c, cred, "credential", err, errlen)) goto out;
            }
            continue;
        }
        if (id == OPT_QUEUE) { /* every -q, else the variable's list */
            for (int k = 0; k < nqueueflags; k++)
                if (apply(c, OPT_QUEUE, queueflags[k], "--queue", err, errlen)) goto out;
            if (nqueueflags == 0 && env && apply(c, OPT_QUEUE, env, options[id].env, err, errlen))
                goto out;
            continue;
        }
        if (flag[id]) {
            snprintf(from, sizeof from, "--%s", options[id].name);
            if (apply(c, (enum opt_id)id, flag[id], from, err, errlen)) goto out;
        } else if (env) {
            if (apply(c, (enum opt_id)id, env, options[id].env, err, errlen)) goto out;
        }
    }
    if (c->nurls == 0 &&
        add_urls(c, "amqp://guest:guest@localhost:5672/", "the default URL", true, err, errlen))
        goto out;
    {
        const char *file_env = getenv("WARREN_PASSWORD_FILE");
        char cred[4096];
        if (flag[OPT_PASSWORD_FILE]) {
            if (set_password(c, flag[OPT_PASSWORD_FILE], "--password-file", err, errlen)) goto out;
        } else if (file_env && *file_env) {
            if (set_password(c, file_env, "WARREN_PASSWORD_FILE", err, errlen)) goto out;
        } else if (credential("password", cred, sizeof cred)) {
            if (set_password(c, cred, "credential", err, errlen)) goto out;
        }
    }
    wr_log_set_level(c->log_level);
    wr_log_set_format(c->log_format);

    int first = 0;
    if (npos > 0 && !strcmp(positional[0], "check")) {
        c->command = WR_CMD_CHECK;
        first = 1;
    } else if (npos > 0 && !strcmp(positional[0], "try")) {
        c->command = WR_CMD_TRY;
        first = 1;
    }
    if (npos <= first) {
        fail(err, errlen, "missing SCRIPT.lua (see warren --help)");
        goto out;
    }
    c->script = positional[first];
    if (c->command == WR_CMD_TRY) {
        c->bodies = positional + first + 1;
        c->nbodies = npos - first - 1;
    } else if (npos > first + 1) {
        fail(err, errlen, "unexpected argument '%s' (see warren --help)", positional[first + 1]);
        goto out;
    }
    if ((c->virtual_time || c->fixtures) && c->command != WR_CMD_TRY) {
        fail(err, errlen, "%s only applies to warren try",
             c->virtual_time ? "--virtual-time" : "--message/--messages");
        goto out;
    }
    if (c->fixtures && c->nbodies > 0) {
        fail(err, errlen, "give bodies or --message/--messages, not both");
        goto out;
    }
    if (c->command == WR_CMD_RUN && c->nqueues == 0) {
        fail(err, errlen, "missing --queue NAME (or WARREN_QUEUE)");
        goto out;
    }
    if (!c->tls_cert != !c->tls_key) {
        fail(err, errlen, "a client certificate needs both --tls-cert and --tls-key");
        goto out;
    }
    if (c->command == WR_CMD_TRY && c->nqueues > 1) {
        fail(err, errlen, "warren try runs its messages as from one queue: give one --queue");
        goto out;
    }
    for (size_t i = 0; i < c->nqueues; i++)
        if (!c->queues[i].prefetch) c->queues[i].prefetch = c->prefetch;
    rc = 0;
out:
    /* Passwords given on the command line or in WARREN_URL anyway: wiped
     * where ps and /proc/PID/cmdline or environ show them, and the variable
     * kept from the programs jobs spawn. */
    for (int k = 0; k < nurlflags; k++)
        wr_url_wipe(urlflags[k]);
    char *env_url = getenv("WARREN_URL");
    if (env_url) {
        wr_url_wipe(env_url);
        unsetenv("WARREN_URL");
    }
    c->positional = positional;
    free(urlflags);
    free(queueflags);
    return rc;
}

void wr_config_free(wr_config *c) {
    for (size_t i = 0; i < c->nurls; i++)
        free(c->urls[i]);
    free(c->urls);
    for (size_t i = 0; i < c->nqueues; i++)
        free(c->queues[i].name);
    free(c->queues);
    free(c->positional);
    memset(c, 0, sizeof *c);
}
