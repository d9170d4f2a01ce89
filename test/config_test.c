/* Option parsing: flags, environment, defaults and one-line errors. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "warren/config.h"
#include "warren/url.h"

static int parse(wr_config *c, char *err, int argc, char **argv) {
    return wr_config_parse(c, argc, argv, err, 256);
}

#define ARGV(...) ((char *[]){"warren", __VA_ARGS__, NULL})
#define ARGC(...) ((int)(sizeof((char *[]){"warren", __VA_ARGS__}) / sizeof(char *)))
#define PARSE(c, err, ...) parse(c, err, ARGC(__VA_ARGS__), ARGV(__VA_ARGS__))

int main(void) {
    wr_config c;
    char err[256];

    unsetenv("WARREN_URL");
    CHECK(PARSE(&c, err, "-q", "jobs", "s.lua") == 0);
    CHECK(c.command == WR_CMD_RUN && c.nqueues == 1 && !strcmp(c.queues[0].name, "jobs") &&
          c.queues[0].prefetch == 1 && !strcmp(c.script, "s.lua"));
    CHECK(c.prefetch == 1 && c.drain_timeout == 5 && c.heartbeat == 10 && c.watch && !c.declare);
    CHECK(c.nurls == 1 && !strcmp(c.urls[0], "amqp://guest:guest@localhost:5672/"));
    CHECK(c.on_error == WR_ON_ERROR_RETRY && c.max_retries == 5);
    CHECK(c.job_timeout == 1500 && c.memory_limit == 0);
    wr_config_free(&c);

    /* The job limits and the failure policy, from flags and from the environment. */
    CHECK(PARSE(&c, err, "-q", "a", "--job-timeout", "0.5", "--memory-limit", "64", "--on-error",
                "reject", "s.lua") == 0);
    CHECK(c.job_timeout == 0.5 && c.memory_limit == 64 && c.on_error == WR_ON_ERROR_REJECT);
    wr_config_free(&c);
    setenv("WARREN_ON_ERROR", "requeue", 1);
    setenv("WARREN_JOB_TIMEOUT", "0", 1);
    setenv("WARREN_MEMORY_LIMIT", "8", 1);
    CHECK(PARSE(&c, err, "-q", "a", "s.lua") == 0);
    CHECK(c.on_error == WR_ON_ERROR_REQUEUE && c.job_timeout == 0 && c.memory_limit == 8);
    wr_config_free(&c);
    unsetenv("WARREN_ON_ERROR");
    unsetenv("WARREN_JOB_TIMEOUT");
    unsetenv("WARREN_MEMORY_LIMIT");
    CHECK(PARSE(&c, err, "-q", "a", "--on-error", "retries", "s.lua") == -1 &&
          strstr(err, "--on-error") && strstr(err, "retries"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a", "--memory-limit", "1.5", "s.lua") == -1 &&
          strstr(err, "--memory-limit"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a", "--job-timeout", "-1", "s.lua") == -1 &&
          strstr(err, "--job-timeout"));
    wr_config_free(&c);

    CHECK(PARSE(&c, err, "--queue=a", "-p8", "-t", "0.5", "--declare", "--no-watch", "-u",
                "amqp://a/,amqp://b/", "--url", "amqp://c/", "s.lua") == 0);
    CHECK(c.prefetch == 8 && c.drain_timeout == 0.5 && c.declare && !c.watch && c.nurls == 3);
    CHECK(!strcmp(c.urls[1], "amqp://b/") && !strcmp(c.urls[2], "amqp://c/"));
    wr_config_free(&c);

    /* The environment fills in; a flag wins over its variable. */
    setenv("WARREN_PREFETCH", "3", 1);
    setenv("WARREN_DRAIN_TIMEOUT", "7", 1);
    setenv("WARREN_QUEUE", "envq", 1);
    CHECK(PARSE(&c, err, "-p", "4", "s.lua") == 0);
    CHECK(c.prefetch == 4 && c.drain_timeout == 7 && c.nqueues == 1 &&
          !strcmp(c.queues[0].name, "envq") && c.queues[0].prefetch == 4);
    wr_config_free(&c);
    setenv("WARREN_PREFETCH", "many", 1);
    CHECK(PARSE(&c, err, "s.lua") == -1 && strstr(err, "WARREN_PREFETCH"));
    wr_config_free(&c);
    unsetenv("WARREN_PREFETCH");
    unsetenv("WARREN_DRAIN_TIMEOUT");
    unsetenv("WARREN_QUEUE");

    CHECK(PARSE(&c, err, "-q", "a", "-p", "-1", "s.lua") == -1 && strstr(err, "--prefetch"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a", "-t", "soon", "s.lua") == -1 && strstr(err, "soon"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a", "--bogus", "s.lua") == -1 && strstr(err, "--bogus"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "s.lua") == -1 && strstr(err, "--queue"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a") == -1 && strstr(err, "SCRIPT"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a", "-u", "http://x/", "s.lua") == -1 && strstr(err, "http://x/"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a", "--heartbeat", "0.5", "s.lua") == -1);
    wr_config_free(&c);

    /* Several queues: repeated, comma lists, each with its own prefetch or --prefetch's. */
    CHECK(PARSE(&c, err, "-q", "img:4", "-q", "mail,a:b:2", "-p", "3", "s.lua") == 0);
    CHECK(c.nqueues == 3 && !strcmp(c.queues[0].name, "img") && c.queues[0].prefetch == 4 &&
          !strcmp(c.queues[1].name, "mail") && c.queues[1].prefetch == 3 &&
          !strcmp(c.queues[2].name, "a:b") && c.queues[2].prefetch == 2);
    wr_config_free(&c);
    setenv("WARREN_QUEUE", "x,y:5", 1);
    CHECK(PARSE(&c, err, "s.lua") == 0);
    CHECK(c.nqueues == 2 && !strcmp(c.queues[1].name, "y") && c.queues[1].prefetch == 5 &&
          c.queues[0].prefetch == 1);
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "z", "s.lua") == 0); /* a flag wins over the variable */
    CHECK(c.nqueues == 1 && !strcmp(c.queues[0].name, "z"));
    wr_config_free(&c);
    unsetenv("WARREN_QUEUE");
    CHECK(PARSE(&c, err, "-q", "a", "-q", "a:3", "s.lua") == -1 && strstr(err, "'a' given twice"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a,", "s.lua") == -1 && strstr(err, "empty"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", "a:0", "s.lua") == -1 && strstr(err, "prefetch"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "-q", ":3", "s.lua") == -1 && strstr(err, "empty"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "try", "-q", "a", "-q", "b", "s.lua") == -1 && strstr(err, "one --queue"));
    wr_config_free(&c);

    /* Passwords: set from a file (escaped), wiped from argv, never in a message. */
    char *u = wr_url_with_password("amqp://bob:old@h:5672/v", "p@ss/w:rd%");
    CHECK(u && !strcmp(u, "amqp://bob:p%40ss%2Fw%3Ard%25@h:5672/v"));
    free(u);
    u = wr_url_with_password("amqps://h/", "x y");
    CHECK(u && !strcmp(u, "amqps://guest:x%20y@h/"));
    free(u);
    u = wr_url_with_password("amqp://bob@h", "pw");
    CHECK(u && !strcmp(u, "amqp://bob:pw@h"));
    free(u);
    char list[] = "amqp://u:secret@h,amqp://v@h2/,amqp://w:pw@h3/v@x";
    wr_url_wipe(list);
    /* Up to the last '@': a password may hold '/' or '@' unescaped. */
    CHECK(!strcmp(list, "amqp://u:******@h,amqp://v@h2/,amqp://w:*******@x"));
    char shown[64];
    wr_url_redact("amqp://u:secret@h/", 18, shown, sizeof shown);
    CHECK(!strcmp(shown, "amqp://u:***@h/"));
    char arg[] = "--url=amqp://u:hunter2@h/";
    CHECK(PARSE(&c, err, arg, "-q", "a", "s.lua") == 0);
    CHECK(!strcmp(arg, "--url=amqp://u:*******@h/") && !strcmp(c.urls[0], "amqp://u:hunter2@h/"));
    wr_config_free(&c);
    char bad[] = "amqp://u:hunter2@h:port/";
    CHECK(PARSE(&c, err, "-u", bad, "-q", "a", "s.lua") == -1 && strstr(err, "u:***@h:port") &&
          !strstr(err, "hunter2"));
    wr_config_free(&c);
    char path[] = "/tmp/warren-config-test-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, "s3cret\n", 7) == 7);
    close(fd);
    char two[] = "amqp://u:x@a/,amqp://b/"; /* argv is writable, a literal is not */
    CHECK(PARSE(&c, err, "-u", two, "--password-file", path, "-q", "a", "s.lua") == 0);
    CHECK(c.nurls == 2 && !strcmp(c.urls[0], "amqp://u:s3cret@a/") &&
          !strcmp(c.urls[1], "amqp://guest:s3cret@b/"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "--url-file", path, "-q", "a", "s.lua") == -1 &&
          strstr(err, "URL 1 is invalid") && !strstr(err, "s3cret"));
    wr_config_free(&c);
    unlink(path);
    CHECK(PARSE(&c, err, "--url-file", "/nonexistent", "-q", "a", "s.lua") == -1 &&
          strstr(err, "--url-file: cannot read /nonexistent"));
    wr_config_free(&c);

    CHECK(PARSE(&c, err, "try", "s.lua", "one", "two") == 0);
    CHECK(c.command == WR_CMD_TRY && c.nbodies == 2 && !strcmp(c.bodies[1], "two"));
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "check", "s.lua") == 0 && c.command == WR_CMD_CHECK);
    wr_config_free(&c);
    CHECK(PARSE(&c, err, "--help") == 0 && c.command == WR_CMD_HELP);
    wr_config_free(&c);
    return REPORT("config_test");
}
