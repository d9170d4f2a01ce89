#include "warren/url.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The user information of the n bytes of url: after "://", up to the last
 * '@' before the path. Returns false when there is none. */
static bool userinfo(const char *url, size_t n, size_t *at, size_t *len) {
    const char *end = url + n;
    const char *p = NULL;
    for (const char *s = url; s + 3 <= end; s++)
        if (!memcmp(s, "://", 3)) {
            p = s + 3;
            break;
        }
    if (!p) return false;
    const char *path = memchr(p, '/', (size_t)(end - p));
    if (!path) path = end;
    const char *atsign = NULL;
    for (const char *s = p; s < path; s++)
        if (*s == '@') atsign = s;
    if (!atsign) return false;
    *at = (size_t)(p - url);
    *len = (size_t)(atsign - p);
    return true;
}

bool wr_url_names_password(const char *url) {
    size_t ui, ulen;
    return userinfo(url, strlen(url), &ui, &ulen) && memchr(url + ui, ':', ulen);
}

/* Where a password may be, for hiding it: from the first ':' after "://"
 * to the last '@', as a password that should have been escaped may hold
 * '/' and '@' itself. More than the password at times (a port, a path),
 * never less. */
static bool secret_span(const char *url, size_t n, size_t *at, size_t *len) {
    const char *p = url, *end = url + n;
    for (const char *s = url; s + 3 <= end; s++)
        if (!memcmp(s, "://", 3)) {
            p = s + 3;
            break;
        }
    const char *last = NULL;
    for (const char *s = p; s < end; s++)
        if (*s == '@') last = s;
    const char *colon = last ? memchr(p, ':', (size_t)(last - p)) : NULL;
    if (!colon) return false;
    *at = (size_t)(colon + 1 - url);
    *len = (size_t)(last - colon - 1);
    return true;
}

void wr_url_redact(const char *url, size_t n, char *out, size_t outlen) {
    size_t at, len;
    if (!secret_span(url, n, &at, &len))
        snprintf(out, outlen, "%.*s", (int)n, url);
    else
        snprintf(out, outlen, "%.*s***%.*s", (int)at, url, (int)(n - at - len), url + at + len);
}

void wr_url_wipe(char *list) {
    for (char *p = list;;) {
        size_t n = strcspn(p, ","), at, len;
        if (secret_span(p, n, &at, &len)) memset(p + at, '*', len);
        if (p[n] == '\0') return;
        p += n + 1;
    }
}

char *wr_url_with_password(const char *url, const char *password) {
    size_t n = strlen(url), ui, ulen;
    bool has_user = userinfo(url, n, &ui, &ulen);
    const char *scheme_end = strstr(url, "://");
    if (!has_user) { /* "amqp://host..." becomes "amqp://guest:PASSWORD@host..." */
        ui = scheme_end ? (size_t)(scheme_end + 3 - url) : 0;
        ulen = 0;
    }
    const char *colon = has_user ? memchr(url + ui, ':', ulen) : NULL;
    size_t user_len = colon ? (size_t)(colon - (url + ui)) : ulen;
    const char *user = has_user ? url + ui : "guest";
    if (!has_user) user_len = 5;
    char *out = malloc(n + 3 * strlen(password) + 16);
    if (!out) return NULL;
    size_t o = 0;
    memcpy(out, url, ui);
    o = ui;
    memcpy(out + o, user, user_len);
    o += user_len;
    out[o++] = ':';
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *s = (const unsigned char *)password; *s; s++) {
        if ((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
            strchr("-._~", *s)) {
            out[o++] = (char)*s;
        } else {
            out[o++] = '%';
            out[o++] = hex[*s >> 4];
            out[o++] = hex[*s & 15];
        }
    }
    out[o++] = '@';
    size_t rest = has_user ? ui + ulen + 1 : ui;
    memcpy(out + o, url + rest, n - rest + 1);
    return out;
}
