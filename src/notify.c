#include "warren/notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "warren/log.h"

struct wr_notify {
    struct ev_loop *loop;
    int fd; /* -1: nobody listens */
    struct sockaddr_un addr;
    socklen_t addrlen;
    bool warned;
    double interval;   /* seconds between WATCHDOG=1, 0 for none */
    double last_sent;  /* wr_notify_monotonic_usec() / 1e6 of the last one */
    ev_timer watchdog; /* fires every interval */
};

unsigned long long wr_notify_monotonic_usec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000ULL;
}

static double seconds(void) {
    return (double)wr_notify_monotonic_usec() / 1e6;
}

static void watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)revents;
    wr_notify *n = w->data;
    n->last_sent = seconds();
    wr_notify_send(n, "WATCHDOG=1");
}

/* The socket named by NOTIFY_SOCKET, or -1. */
static int open_socket(wr_notify *n, const char *name) {
    if (!name || !*name) return -1;
    size_t len = strlen(name);
    if ((name[0] != '/' && name[0] != '@') || len >= sizeof n->addr.sun_path) {
        wr_warn("NOTIFY_SOCKET=%s is not a socket path: not notifying the service manager", name);
        return -1;
    }
    n->addr.sun_family = AF_UNIX;
    memcpy(n->addr.sun_path, name, len);
    if (name[0] == '@') n->addr.sun_path[0] = '\0'; /* the abstract namespace */
    n->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) wr_warn("cannot open the notify socket: %s", strerror(errno));
    return fd;
}

wr_notify *wr_notify_new(struct ev_loop *loop) {
    wr_notify *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    n->loop = loop;
    n->fd = open_socket(n, getenv("NOTIFY_SOCKET"));
    const char *usec = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
    char *end = NULL;
    unsigned long long us = usec ? strtoull(usec, &end, 10) : 0;
    bool ours = !pid || strtol(pid, NULL, 10) == (long)getpid();
    if (n->fd >= 0 && us > 0 && end && *end == '\0' && ours) n->interval = (double)us / 2e6;
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    ev_timer_init(&n->watchdog, watchdog_cb, n->interval, n->interval);
    n->watchdog.data = n;
    if (n->interval > 0) {
        n->last_sent = seconds();
        ev_timer_start(loop, &n->watchdog);
    }
    return n;
}

bool wr_notify_enabled(const wr_notify *n) {
    return n->fd >= 0;
}

void wr_notify_send(wr_notify *n, const char *fmt, ...) {
    if (n->fd < 0) return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (len < 0) return;
    if ((size_t)len >= sizeof buf) len = sizeof buf - 1;
    if (sendto(n->fd, buf, (size_t)len, MSG_NOSIGNAL, (struct sockaddr *)&n->addr, n->addrlen) <
            0 &&
        !n->warned) {
        n->warned = true;
        wr_debug("cannot notify the service manager: %s", strerror(errno));
    }
}

void wr_notify_keepalive(wr_notify *n) {
    if (n->interval <= 0 || seconds() - n->last_sent < n->interval) return;
    n->last_sent = seconds();
    wr_notify_send(n, "WATCHDOG=1");
}

void wr_notify_free(wr_notify *n) {
    if (!n) return;
    ev_timer_stop(n->loop, &n->watchdog);
    if (n->fd >= 0) close(n->fd);
    free(n);
}
