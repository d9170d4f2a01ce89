/* Libraries loaded at run time, on first use (libmicrohttpd for --metrics,
 * libcurl for warren.http): linked in, each would cost every worker resident
 * memory whether it is used or not. */
#ifndef WARREN_DL_H
#define WARREN_DL_H

#include <stddef.h>

/* One function to look up: where its pointer goes, and its name. */
typedef struct wr_dl_sym {
    void *fn; /* the address of a function pointer */
    const char *name;
} wr_dl_sym;

/* Opens lib and fills each of the n syms. Returns the handle; or NULL with
 * err, "WHAT needs LIB (Debian package PKG): why" or "WHAT: LIB has no
 * NAME", and nothing kept open. */
void *wr_dl_open(const char *lib, const char *what, const char *pkg, const wr_dl_sym *syms,
                 size_t n, char *err, size_t errlen);

#endif
