#include "warren/dl.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

void *wr_dl_open(const char *lib, const char *what, const char *pkg, const wr_dl_sym *syms,
                 size_t n, char *err, size_t errlen) {
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(err, errlen, "%s needs %s (Debian package %s): %s", what, lib, pkg, dlerror());
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        void *p = dlsym(h, syms[i].name);
        if (!p) {
            snprintf(err, errlen, "%s: %s has no %s", what, lib, syms[i].name);
            dlclose(h);
            return NULL;
        }
        /* POSIX: a function pointer converts from dlsym's void * through memcpy. */
        memcpy(syms[i].fn, &p, sizeof p);
    }
    return h;
}
