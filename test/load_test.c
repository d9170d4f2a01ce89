/* Loading a version a slice at a time, without a loop or a broker: a main
 * chunk that computes is handed back every slice, one that catches errors
 * behind a C function is still ended by the urgent work, and errors of any
 * value are described on one line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "warren/job.h"
#include "warren/load.h"

static char *script_with(const char *text) {
    static char path[64];
    snprintf(path, sizeof path, "/tmp/warren-load-test-XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) {
        perror("load_test");
        exit(1);
    }
    close(fd);
    return path;
}

typedef struct steps {
    int running; /* WR_LOAD_RUNNING steps */
    double longest;
    wr_load_status last;
    char err[512];
} steps;

static wr_vm *load_stepwise(const char *text, const wr_ctx *ctx, steps *st) {
    char *path = script_with(text);
    memset(st, 0, sizeof *st);
    wr_load *ld = wr_load_begin(path, 1, ctx, st->err, sizeof st->err);
    if (!ld) {
        st->last = WR_LOAD_FAILED;
        unlink(path);
        return NULL;
    }
    for (;;) {
        double t = wr_clock();
        st->last = wr_load_step(ld, st->err, sizeof st->err);
        if (wr_clock() - t > st->longest) st->longest = wr_clock() - t;
        if (st->last != WR_LOAD_RUNNING) break;
        st->running++;
    }
    unlink(path);
    return wr_load_end(ld);
}

static void computation_is_sliced(void) {
    static const wr_ctx ctx;
    steps st;
    wr_vm *vm = load_stepwise("local t = os.clock()\n"
                              "while os.clock() - t < 0.2 do end\n"
                              "function handle() end\n",
                              &ctx, &st);
    CHECK(vm != NULL);
    CHECK(st.last == WR_LOAD_READY);
    /* 200 ms of computation in slices of 10 ms: many steps, none long. */
    CHECK(st.running >= 5);
    CHECK(st.longest < 0.1);
    if (vm) wr_vm_unref(vm);
}

static int urgent_calls;
static bool stop_on_third(void *ud) {
    (void)ud;
    return ++urgent_calls >= 3;
}

static void urgent_work_ends_a_chunk_behind_a_c_function(void) {
    wr_ctx ctx = {.urgent = stop_on_third};
    steps st;
    double t = wr_clock();
    wr_vm *vm = load_stepwise("table.sort({ 3, 1, 2 }, function(a, b)\n"
                              "  while true do pcall(function() while true do end end) end\n"
                              "end)\n"
                              "function handle() end\n",
                              &ctx, &st);
    CHECK(vm == NULL);
    CHECK(st.last == WR_LOAD_FAILED);
    CHECK(urgent_calls == 3);
    CHECK(strstr(st.err, ": stopped while loading: the worker is stopping") != NULL);
    CHECK(wr_clock() - t < 2);
}

static void errors_are_one_line(void) {
    static const wr_ctx ctx;
    static const struct {
        const char *text, *want;
    } cases[] = {
        {"local x = 1\nerror({})\n", ":2: (error object is a table value)"},
        {"error(setmetatable({}, { __tostring = function() return 'told' end }))\n", "told"},
        {"error(setmetatable({}, { __tostring = function() error('x') end }))\n",
         ":1: (an error whose description itself failed)"},
        {"local x = 1\n", ": no handle(body, msg) function"},
        {"return setmetatable({}, { __index = function() error('no way') end })\n", ": no way"},
        {"function handle() end\nlocal t = {\n", ": unexpected symbol near <eof>"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        steps st;
        wr_vm *vm = load_stepwise(cases[i].text, &ctx, &st);
        CHECK(vm == NULL);
        CHECK(st.last == WR_LOAD_FAILED);
        CHECK(strchr(st.err, '\n') == NULL);
        if (!strstr(st.err, cases[i].want)) {
            fprintf(stderr, "case %zu: \"%s\" lacks \"%s\"\n", i, st.err, cases[i].want);
            failures++;
        }
    }
}

int main(void) {
    computation_is_sliced();
    urgent_work_ends_a_chunk_behind_a_c_function();
    errors_are_one_line();
    return REPORT("load_test");
}
