/* warren: a worker host for RabbitMQ work queues. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "warren/config.h"
#include "warren/host.h"
#include "warren/try.h"

int main(int argc, char **argv) {
    wr_config cfg;
    char err[512];
    int code;
    if (wr_config_parse(&cfg, argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "warren: %s\n", err);
        wr_config_free(&cfg);
        return WR_EXIT_USAGE;
    }
    /* A script that cannot be read is a usage error of its own kind (78),
     * reported like the others, before anything starts. */
    bool scripted =
        cfg.command == WR_CMD_RUN || cfg.command == WR_CMD_CHECK || cfg.command == WR_CMD_TRY;
    if (scripted && access(cfg.script, R_OK) != 0) {
        fprintf(stderr, "warren: cannot open %s: %s\n", cfg.script, strerror(errno));
        wr_config_free(&cfg);
        return WR_EXIT_CONFIG;
    }
    switch (cfg.command) {
    case WR_CMD_HELP:
        fputs(wr_usage, stdout);
        code = 0;
        break;
    case WR_CMD_VERSION:
        printf("warren %s\n", WARREN_VERSION);
        code = 0;
        break;
    case WR_CMD_CHECK:
        code = wr_check(&cfg);
        break;
    case WR_CMD_TRY:
        code = wr_try(&cfg);
        break;
    default:
        code = wr_host_run(&cfg);
        break;
    }
    wr_config_free(&cfg);
    return code;
}
