#define _GNU_SOURCE /* fopen's "e" flag */
#include "warren/http.h"

#define CURL_DISABLE_TYPECHECK /* libcurl is called through pointers, not its macros */
#include <curl/curl.h>
#include <dlfcn.h>
#include <errno.h>
#include <ev.h>
#include <lauxlib.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "warren/context.h"
#include "warren/dl.h"
#include "warren/job.h"
#include "warren/log.h"
#include "warren/lua_api.h"
#include "warren/stats.h"

/* libcurl, loaded on the first request: linked in, it and what it brings
 * (its protocol libraries) would cost every worker resident memory, whether
 * its scripts make requests or not. */
#define CURL_LIBRARY "libcurl.so.4"
static struct {
    void *lib;
    CURLcode (*global_init)(long);
    void (*global_cleanup)(void);
    CURL *(*easy_init)(void);
    CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
    CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
    void (*easy_cleanup)(CURL *);
    const char *(*easy_strerror)(CURLcode);
    struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
    void (*slist_free_all)(struct curl_slist *);
    CURLM *(*multi_init)(void);
    CURLMcode (*multi_setopt)(CURLM *, CURLMoption, ...);
    CURLMcode (*multi_add_handle)(CURLM *, CURL *);
    CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
    CURLMcode (*multi_socket_action)(CURLM *, curl_socket_t, int, int *);
    CURLMsg *(*multi_info_read)(CURLM *, int *);
    CURLMcode (*multi_assign)(CURLM *, curl_socket_t, void *);
    CURLMcode (*multi_cleanup)(CURLM *);
    const char *(*multi_strerror)(CURLMcode);
} cu;

/* Loads the library once. Returns 0, or -1 with err. */
static int load_curl(char *err, size_t errlen) {
    if (cu.lib) return 0;
    const wr_dl_sym syms[] = {
        {&cu.global_init, "curl_global_init"},
        {&cu.global_cleanup, "curl_global_cleanup"},
        {&cu.easy_init, "curl_easy_init"},
        {&cu.easy_setopt, "curl_easy_setopt"},
        {&cu.easy_getinfo, "curl_easy_getinfo"},
        {&cu.easy_cleanup, "curl_easy_cleanup"},
        {&cu.easy_strerror, "curl_easy_strerror"},
        {&cu.slist_append, "curl_slist_append"},
        {&cu.slist_free_all, "curl_slist_free_all"},
        {&cu.multi_init, "curl_multi_init"},
        {&cu.multi_setopt, "curl_multi_setopt"},
        {&cu.multi_add_handle, "curl_multi_add_handle"},
        {&cu.multi_remove_handle, "curl_multi_remove_handle"},
        {&cu.multi_socket_action, "curl_multi_socket_action"},
        {&cu.multi_info_read, "curl_multi_info_read"},
        {&cu.multi_assign, "curl_multi_assign"},
        {&cu.multi_cleanup, "curl_multi_cleanup"},
        {&cu.multi_strerror, "curl_multi_strerror"},
    };
    void *lib = wr_dl_open(CURL_LIBRARY, "warren.http", "libcurl4", syms,
                           sizeof syms / sizeof syms[0], err, errlen);
    if (!lib) return -1;
    if (cu.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        snprintf(err, errlen, "warren.http: %s did not initialise", CURL_LIBRARY);
        dlclose(lib);
        return -1;
    }
    cu.lib = lib;
    return 0;
}

/* A growing byte buffer. */
typedef struct buf {
    char *data;
    size_t len, cap;
} buf;

static bool buf_add(buf *b, const char *bytes, size_t n) {
    if (b->len + n > b->cap) {
        size_t want = b->cap ? b->cap : 4096;
        while (want < b->len + n)
            want *= 2;
        char *grown = realloc(b->data, want);
        if (!grown) return false;
        b->data = grown;
        b->cap = want;
    }
    memcpy(b->data + b->len, bytes, n);
    b->len += n;
    return true;
}

/* One transfer, owned by the job that waits for it. */
typedef struct xfer {
    CURL *easy;
    wr_job *job;
    wr_stats *stats;
    struct curl_slist *headers;
    char method[16];
    char *where;      /* scheme://host/path, without the query (it may hold secrets): for logs */
    buf body;         /* the response body, when it is kept in memory */
    buf head;         /* the header lines of the last response */
    size_t max_body;  /* 0: no limit */
    size_t received;  /* bytes of body so far */
    bool too_big;     /* stopped at max_body */
    bool write_error; /* the output file could not be written */
    FILE *out;        /* output_file */
    char *out_path;
    FILE *in; /* body_file */
    CURLcode result;
    double started;
    char errbuf[CURL_ERROR_SIZE];
} xfer;

/* One socket libcurl asked to watch. */
typedef struct sockw {
    ev_io io;
} sockw;

static struct ev_loop *loop;
static CURLM *multi;
static ev_timer timer;

static void free_xfer(xfer *x) {
    if (x->easy) {
        if (multi) cu.multi_remove_handle(multi, x->easy);
        cu.easy_cleanup(x->easy);
    }
    if (x->headers) cu.slist_free_all(x->headers);
    if (x->out) fclose(x->out);
    if (x->in) fclose(x->in);
    free(x->out_path);
    free(x->where);
    free(x->body.data);
    free(x->head.data);
    free(x);
}

/* Removes a partly written output file: a file that is there holds a whole body. */
static void drop_output(xfer *x) {
    if (!x->out) return;
    fclose(x->out);
    x->out = NULL;
    unlink(x->out_path);
}

static size_t write_cb(char *data, size_t size, size_t n, void *ud) {
    xfer *x = ud;
    size_t len = size * n;
    if (x->max_body && x->received + len > x->max_body) {
        x->too_big = true;
        return 0;
    }
    x->received += len;
    if (x->out) {
        if (fwrite(data, 1, len, x->out) != len) {
            x->write_error = true;
            return 0;
        }
        return len;
    }
    return buf_add(&x->body, data, len) ? len : 0;
}

static size_t header_cb(char *data, size_t size, size_t n, void *ud) {
    xfer *x = ud;
    size_t len = size * n;
    /* A status line starts a new response (after a redirect, a 100 Continue). */
    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) x->head.len = 0;
    return buf_add(&x->head, data, len) ? len : 0;
}

/* Protected (wr_job_results): res, or nil and the error, of the transfer
 * (argument 1). */
static int push_result(lua_State *L) {
    xfer *x = lua_touserdata(L, 1);
    if (x->result != CURLE_OK) {
        lua_pushnil(L);
        if (x->too_big)
            lua_pushfstring(L, "the response body is larger than max_body (%I bytes)",
                            (lua_Integer)x->max_body);
        else if (x->write_error)
            lua_pushfstring(L, "cannot write to '%s'", x->out_path);
        else
            lua_pushfstring(L, "%s", x->errbuf[0] ? x->errbuf : cu.easy_strerror(x->result));
        return 2;
    }
    long status = 0;
    cu.easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");
    char *url = NULL;
    if (cu.easy_getinfo(x->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url) {
        lua_pushstring(L, url);
        lua_setfield(L, -2, "url");
    }
    /* Header names in lower case; repeated ones joined with ", ". */
    lua_newtable(L);
    const char *p = x->head.data, *end = p + x->head.len;
    while (p && p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon && colon > p && !(eol - p >= 5 && memcmp(p, "HTTP/", 5) == 0)) {
            luaL_Buffer name;
            luaL_buffinit(L, &name);
            for (const char *c = p; c < colon; c++)
                luaL_addchar(&name, (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c));
            luaL_pushresult(&name);
            const char *v = colon + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            lua_pushvalue(L, -1);
            if (lua_rawget(L, -3) == LUA_TSTRING) {
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t)(ve - v));
            }
            lua_rawset(L, -3);
        }
        p = eol + 1;
    }
    lua_setfield(L, -2, "headers");
    if (x->out_path)
        lua_pushstring(L, x->out_path);
    else
        lua_pushlstring(L, x->body.data ? x->body.data : "", x->body.len);
    lua_setfield(L, -2, "body");
    return 1;
}

/* Adds one to a counter of warren_http_requests_total, when there are stats. */
#define COUNT(stats, result)                                                                       \
    do {                                                                                           \
        if (stats) (stats)->http_##result++;                                                       \
    } while (0)

/* libcurl is done with x: the job is resumed with its result. */
static void done(xfer *x) {
    wr_job *j = x->job;
    wr_log_job f = wr_delivery_log_fields(wr_job_delivery(j), wr_job_version(j));
    double took = wr_clock() - x->started;
    if (x->out) {
        FILE *out = x->out;
        x->out = NULL;
        if (fclose(out) != 0 && x->result == CURLE_OK) {
            x->write_error = true;
            x->result = CURLE_WRITE_ERROR;
        }
        if (x->result != CURLE_OK) unlink(x->out_path);
    }
    if (x->result == CURLE_OK) {
        long status = 0;
        cu.easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
        COUNT(x->stats, ok);
        wr_log_for(WR_LOG_DEBUG, &f, "http %s %s: %ld, %zu bytes in %.3f s", x->method, x->where,
                   status, x->received, took);
    } else {
        bool timeout = x->result == CURLE_OPERATION_TIMEDOUT;
        if (timeout)
            COUNT(x->stats, timeout);
        else
            COUNT(x->stats, error);
        wr_log_for(WR_LOG_WARN, &f, "http %s %s failed after %.3f s: %s", x->method, x->where, took,
                   x->too_big     ? "the body is larger than max_body"
                   : x->errbuf[0] ? x->errbuf
                                  : cu.easy_strerror(x->result));
    }
    int n = wr_job_results(j, push_result, x);
    free_xfer(x);
    wr_job_resume_results(j, n, "warren.http");
}

/* Hands each finished transfer to its job. A resumed job may start or cancel
 * transfers, so the messages are read one at a time. */
static void check_done(void) {
    CURLMsg *m;
    int left;
    while (multi && (m = cu.multi_info_read(multi, &left))) {
        if (m->msg != CURLMSG_DONE) continue;
        xfer *x = NULL;
        cu.easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
        x->result = m->data.result;
        cu.multi_remove_handle(multi, x->easy);
        done(x);
    }
}

static void io_cb(struct ev_loop *l, ev_io *w, int revents) {
    (void)l;
    int action =
        (revents & EV_READ ? CURL_CSELECT_IN : 0) | (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
    int running;
    cu.multi_socket_action(multi, w->fd, action, &running);
    check_done();
}

static void timer_cb(struct ev_loop *l, ev_timer *w, int revents) {
    (void)l, (void)w, (void)revents;
    int running;
    cu.multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done();
}

/* CURLMOPT_TIMERFUNCTION: when libcurl wants to be called next; -1: never. */
static int curl_timer_cb(CURLM *m, long ms, void *ud) {
    (void)m, (void)ud;
    ev_timer_stop(loop, &timer);
    if (ms >= 0) {
        ev_timer_set(&timer, (double)ms / 1000.0, 0);
        ev_timer_start(loop, &timer);
    }
    return 0;
}

/* CURLMOPT_SOCKETFUNCTION: what to watch on a socket, or to stop. */
static int curl_socket_cb(CURL *e, curl_socket_t s, int what, void *ud, void *socketp) {
    (void)e, (void)ud;
    sockw *w = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (w) {
            ev_io_stop(loop, &w->io);
            free(w);
        }
        return 0;
    }
    if (!w) {
        w = calloc(1, sizeof *w);
        if (!w) return -1;
        ev_init(&w->io, io_cb);
        cu.multi_assign(multi, s, w);
    }
    int events = (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
    ev_io_stop(loop, &w->io);
    ev_io_set(&w->io, s, events);
    ev_io_start(loop, &w->io);
    return 0;
}

/* The job is interrupted or failed: the transfer stops where it is. */
static void cancel_cb(wr_job *j, void *data) {
    xfer *x = data;
    wr_log_job f = wr_delivery_log_fields(wr_job_delivery(j), wr_job_version(j));
    wr_log_for(WR_LOG_DEBUG, &f, "http %s %s cancelled after %.3f s, %zu bytes received", x->method,
               x->where, wr_clock() - x->started, x->received);
    COUNT(x->stats, cancelled);
    drop_output(x);
    free_xfer(x);
}

/* The multi handle on l, made on first use. Returns 0, or -1 with err. */
static int ensure_multi(struct ev_loop *l, char *err, size_t errlen) {
    if (multi) return 0;
    if (load_curl(err, errlen)) return -1;
    multi = cu.multi_init();
    if (!multi) {
        snprintf(err, errlen, "warren.http: out of memory");
        return -1;
    }
    loop = l;
    ev_timer_init(&timer, timer_cb, 0, 0);
    cu.multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, curl_socket_cb);
    cu.multi_setopt(multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb);
    /* A peer that closes early must give an error, not end warren. */
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

/* What wr_http_lua gathered from its arguments; the strings stay on the
 * Lua stack until it returns. */
typedef struct request {
    const char *method, *url, *body, *body_file, *output_file, *ca;
    size_t body_len;
    int headers; /* stack index of the headers table, 0: none */
    double timeout;
    size_t max_body;
    bool max_body_given, follow, verify;
} request;

static const char *const option_names[] = {"method",    "url",         "headers", "body",
                                           "body_file", "output_file", "timeout", "max_body",
                                           "follow",    "verify",      "ca",      NULL};

/* The field of the options table (index 1) as a string without NUL or line
 * breaks, or NULL when it is absent. Leaves it on the stack. */
static const char *opt_string(lua_State *L, const char *name, bool binary, size_t *len) {
    int t = lua_getfield(L, 1, name);
    if (t == LUA_TNIL) return NULL;
    if (t != LUA_TSTRING)
        luaL_error(L, "warren.http: %s must be a string, got %s", name, luaL_typename(L, -1));
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    if (!binary && strcspn(s, "\r\n") != n)
        luaL_error(L, "warren.http: %s contains a NUL byte or a line break", name);
    if (len) *len = n;
    return s;
}

static bool opt_bool(lua_State *L, const char *name, bool dflt) {
    int t = lua_getfield(L, 1, name);
    lua_pop(L, 1);
    if (t == LUA_TNIL) return dflt;
    if (t != LUA_TBOOLEAN) luaL_error(L, "warren.http: %s must be true or false", name);
    lua_getfield(L, 1, name);
    bool v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* A header name or value: a string (or number) without NUL or line break. */
static void check_header(lua_State *L, int idx, const char *what) {
    int t = lua_type(L, idx);
    size_t n;
    const char *s = t == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
    if (t == LUA_TNUMBER) return;
    bool name = strcmp(what, "name") == 0;
    if (!s || strcspn(s, "\r\n") != n || (name && (n == 0 || strchr(s, ':'))))
        luaL_error(L,
                   "warren.http: headers must map names (without ':') to strings, without line "
                   "breaks: bad %s",
                   what);
}

static void read_request(lua_State *L, request *rq) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    wr_lua_check_options(L, 1, "http", option_names);
    rq->url = opt_string(L, "url", false, NULL);
    if (!rq->url) luaL_error(L, "warren.http: url is required");
    rq->body = opt_string(L, "body", true, &rq->body_len);
    rq->body_file = opt_string(L, "body_file", false, NULL);
    rq->output_file = opt_string(L, "output_file", false, NULL);
    rq->ca = opt_string(L, "ca", false, NULL);
    if (rq->body && rq->body_file)
        luaL_error(L, "warren.http: body and body_file do not go together");
    rq->method = opt_string(L, "method", false, NULL);
    if (!rq->method) rq->method = rq->body ? "POST" : rq->body_file ? "PUT" : "GET";
    size_t mlen = strlen(rq->method);
    if (mlen == 0 || mlen > 15 || strspn(rq->method, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") != mlen)
        luaL_error(L, "warren.http: method must be an upper-case word such as GET or PUT");
    if (lua_getfield(L, 1, "headers") != LUA_TNIL) {
        luaL_argexpected(L, lua_type(L, -1) == LUA_TTABLE, 1, "headers as a table");
        rq->headers = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, rq->headers)) {
            check_header(L, -2, "name");
            if (lua_type(L, -2) != LUA_TSTRING) luaL_error(L, "warren.http: bad header name");
            check_header(L, -1, "value");
            lua_pop(L, 1);
        }
    }
    rq->timeout = WR_HTTP_TIMEOUT;
    if (lua_getfield(L, 1, "timeout") != LUA_TNIL) {
        lua_Number t = lua_tonumber(L, -1);
        if (lua_type(L, -1) != LUA_TNUMBER || !(t > 0) || !isfinite(t) || t > 1e9)
            luaL_error(L, "warren.http: timeout must be a positive number of seconds");
        rq->timeout = (double)t;
    }
    rq->max_body = rq->output_file ? 0 : WR_HTTP_MAX_BODY;
    if (lua_getfield(L, 1, "max_body") != LUA_TNIL) {
        lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : -1;
        if (n <= 0) luaL_error(L, "warren.http: max_body must be a positive number of bytes");
        rq->max_body = (size_t)n;
        rq->max_body_given = true;
    }
    rq->follow = opt_bool(L, "follow", false);
    rq->verify = opt_bool(L, "verify", true);
}

/* scheme://host/path of url, without its query and fragment, for logs. */
static char *log_url(const char *url) {
    return strndup(url, strcspn(url, "?#"));
}

/* Makes the transfer of rq. Returns it, or NULL with err. */
static xfer *prepare(lua_State *L, const request *rq, char *err, size_t errlen) {
    xfer *x = calloc(1, sizeof *x);
    if (!x || !(x->where = log_url(rq->url)) || !(x->easy = cu.easy_init())) {
        snprintf(err, errlen, "warren.http: out of memory");
        goto fail;
    }
    snprintf(x->method, sizeof x->method, "%s", rq->method);
    x->max_body = rq->max_body;
    if (rq->body_file) {
        struct stat st;
        x->in = fopen(rq->body_file, "rbe");
        if (!x->in || fstat(fileno(x->in), &st) != 0) {
            snprintf(err, errlen, "warren.http: cannot read body_file '%s': %s", rq->body_file,
                     strerror(errno));
            goto fail;
        }
        cu.easy_setopt(x->easy, CURLOPT_UPLOAD, 1L);
        cu.easy_setopt(x->easy, CURLOPT_READDATA, x->in);
        cu.easy_setopt(x->easy, CURLOPT_INFILESIZE_LARGE, (curl_off_t)st.st_size);
    }
    if (rq->output_file) {
        x->out = fopen(rq->output_file, "wbe");
        if (!x->out || !(x->out_path = strdup(rq->output_file))) {
            snprintf(err, errlen, "warren.http: cannot write output_file '%s': %s", rq->output_file,
                     strerror(errno));
            goto fail;
        }
    }
    /* No "Expect: 100-continue" wait before an upload. */
    x->headers = cu.slist_append(NULL, "Expect:");
    if (rq->headers) {
        lua_pushnil(L);
        while (lua_next(L, rq->headers)) {
            char num[32];
            const char *v = num;
            if (lua_isinteger(L, -1))
                snprintf(num, sizeof num, "%lld", (long long)lua_tointeger(L, -1));
            else if (lua_type(L, -1) == LUA_TNUMBER)
                snprintf(num, sizeof num, "%.14g", (double)lua_tonumber(L, -1));
            else
                v = lua_tostring(L, -1);
            lua_pop(L, 1);
            if (!x->headers) continue;
            const char *name = lua_tostring(L, -1);
            size_t len = strlen(name) + strlen(v) + 3;
            char *line = malloc(len);
            struct curl_slist *more = NULL;
            if (line) {
                snprintf(line, len, *v ? "%s: %s" : "%s;", name, v);
                more = cu.slist_append(x->headers, line);
                free(line);
            }
            if (!more) cu.slist_free_all(x->headers);
            x->headers = more;
        }
    }
    if (!x->headers) {
        snprintf(err, errlen, "warren.http: out of memory");
        goto fail;
    }
    CURL *e = x->easy;
    long timeout_ms = (long)ceil(rq->timeout * 1000);
    long connect_ms = (long)ceil(fmin(rq->timeout, WR_HTTP_CONNECT_TIMEOUT) * 1000);
    CURLcode rc = CURLE_OK;
#define SET(opt, val)                                                                              \
    if (rc == CURLE_OK) rc = cu.easy_setopt(e, opt, val)
    SET(CURLOPT_PRIVATE, x);
    SET(CURLOPT_ERRORBUFFER, x->errbuf);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_URL, rq->url);
    SET(CURLOPT_HTTPHEADER, x->headers);
    SET(CURLOPT_USERAGENT, "warren/" WARREN_VERSION);
    SET(CURLOPT_TIMEOUT_MS, timeout_ms);
    SET(CURLOPT_CONNECTTIMEOUT_MS, connect_ms);
    SET(CURLOPT_WRITEFUNCTION, write_cb);
    SET(CURLOPT_WRITEDATA, x);
    SET(CURLOPT_HEADERFUNCTION, header_cb);
    SET(CURLOPT_HEADERDATA, x);
    if (rq->follow) {
        SET(CURLOPT_FOLLOWLOCATION, 1L);
        SET(CURLOPT_MAXREDIRS, (long)WR_HTTP_MAX_REDIRS);
        SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    }
    if (!rq->verify) {
        SET(CURLOPT_SSL_VERIFYPEER, 0L);
        SET(CURLOPT_SSL_VERIFYHOST, 0L);
    }
    if (rq->ca) {
        SET(CURLOPT_CAINFO, rq->ca);
        SET(CURLOPT_CAPATH, (char *)NULL); /* only these CAs, not also the system's directory */
    }
    if (rq->body) {
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
        SET(CURLOPT_COPYPOSTFIELDS, rq->body);
        if (strcmp(rq->method, "POST") != 0) SET(CURLOPT_CUSTOMREQUEST, rq->method);
    } else if (rq->body_file) {
        if (strcmp(rq->method, "PUT") != 0) SET(CURLOPT_CUSTOMREQUEST, rq->method);
    } else if (strcmp(rq->method, "HEAD") == 0) {
        SET(CURLOPT_NOBODY, 1L);
    } else if (strcmp(rq->method, "GET") != 0) {
        SET(CURLOPT_CUSTOMREQUEST, rq->method);
    }
#undef SET
    /* A transfer cancelled while its name is being resolved must not wait
     * for the resolver's thread (the loop would stop with it): the thread is
     * left to end on its own. libcurl before 7.87 lacks the option. */
    if (rc == CURLE_OK) cu.easy_setopt(e, CURLOPT_QUICK_EXIT, 1L);
    if (rc != CURLE_OK) {
        snprintf(err, errlen, "warren.http: %s", cu.easy_strerror(rc));
        goto fail;
    }
    CURLMcode mrc = cu.multi_add_handle(multi, e);
    if (mrc != CURLM_OK) {
        snprintf(err, errlen, "warren.http: %s", cu.multi_strerror(mrc));
        goto fail;
    }
    return x;

fail:
    if (x) {
        if (x->out) unlink(rq->output_file);
        free_xfer(x);
    }
    return NULL;
}

int wr_http_lua(lua_State *L) {
    wr_job *j = wr_job_need_wait(L, "http");
    request rq = {0};
    read_request(L, &rq);
    const wr_vm *vm = lua_touserdata(L, lua_upvalueindex(1));
    wr_stats *stats = vm->ctx->stats;
    char err[512];
    xfer *x =
        ensure_multi(vm->ctx->loop, err, sizeof err) ? NULL : prepare(L, &rq, err, sizeof err);
    if (!x) {
        COUNT(stats, error);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    x->job = j;
    x->stats = stats;
    x->started = wr_clock();
    wr_job_wait(j, WR_WAIT_HTTP, cancel_cb, x);
    return lua_yield(L, 0);
}

void wr_http_shutdown(void) {
    if (!multi) return;
    cu.multi_cleanup(multi); /* closes the idle connections */
    multi = NULL;
    ev_timer_stop(loop, &timer);
    cu.global_cleanup();
}
