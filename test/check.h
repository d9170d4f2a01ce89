/* A minimal assertion macro for the C unit tests: failures are counted and
 * reported with file and line, and main returns non-zero if any failed. */
#ifndef WARREN_TEST_CHECK_H
#define WARREN_TEST_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#define REPORT(name) (printf("%s: %s\n", name, failures ? "FAILED" : "ok"), failures ? 1 : 0)

#endif
