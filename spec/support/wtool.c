/*
 * wtool: a small AMQP client for the specs and benchmarks of warren.
 *
 *   wtool [--url URL] [--timeout S] declare QUEUE [--dead-letter DLQ] [--fresh] [--type TYPE]
 *         (--type: the x-queue-type argument, e.g. quorum; a dead-letter queue stays classic)
 *   wtool [--url URL] [--timeout S] delete QUEUE
 *   wtool [--url URL] [--timeout S] publish QUEUE --count N [--prefix P]
 *         [--body STR | --body-file FILE | --body-size BYTES] [--header K=V]... [--expiration MS]
 *         [--nested-header K=DEPTH]   (K holds DEPTH arrays, one in another, around "bottom")
 *   wtool [--url URL] [--timeout S] depth QUEUE          prints "READY CONSUMERS"
 *   wtool [--url URL] [--timeout S] drain QUEUE [--max N]
 *         prints "MESSAGE_ID REDELIVERED BODYLEN XDEATHCOUNT" per message, acks each
 *   wtool [--url URL] [--timeout S] get QUEUE            writes one body to stdout, exit 2 if empty
 *
 * Options may come before or after the subcommand. The URL defaults to the environment variable
 * WARREN_TEST_URL. Every failure prints one line on stderr and exits 1. The whole run is bounded by
 * --timeout seconds (default 120, 0 for none) so that a black-holed broker cannot hang a spec.
 */
#define _POSIX_C_SOURCE 200809L

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#define CHANNEL 1
#define MAX_HEADERS 64
/* Most unconfirmed messages in flight, and the most body bytes they may hold together. */
#define CONFIRM_WINDOW 1000
#define CONFIRM_WINDOW_BYTES (64u * 1024u * 1024u)

struct options {
    const char *command;
    const char *queue;
    const char *url;
    const char *dead_letter;
    const char *queue_type; /* --type: NULL when not given */
    const char *prefix;
    const char *body;
    const char *body_file;
    const char *expiration;
    long long body_size; /* -1: not given */
    long long count;     /* -1: not given */
    long long max;       /* -1: no limit */
    double timeout;
    int fresh;
    int nheaders;
    char *header_keys[MAX_HEADERS];
    char *header_values[MAX_HEADERS];
    char *nested_key; /* --nested-header: NULL when not given */
    long long nested_depth;
};

/* What the program is doing, for error lines; always points to a string literal. */
static const char *volatile current_step = "start";

/* Prints "wtool: STEP: MESSAGE" on stderr and exits 1. */
static void die(const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "wtool: %s: %s\n", current_step, line);
    exit(1);
}

/* Async-signal-safe: write(2) of constant strings only. */
static void on_alarm(int sig) {
    (void)sig;
    static const char head[] = "wtool: ";
    static const char tail[] = ": timed out (broker unresponsive?)\n";
    ssize_t ignored = write(STDERR_FILENO, head, sizeof head - 1);
    ignored = write(STDERR_FILENO, current_step, strlen(current_step));
    ignored = write(STDERR_FILENO, tail, sizeof tail - 1);
    (void)ignored;
    _exit(1);
}

/* Arms a watchdog for the whole run; seconds <= 0 disables it. */
static void arm_watchdog(double seconds) {
    if (seconds <= 0) return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_sec = (time_t)seconds;
    it.it_value.tv_usec = (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6);
    setitimer(ITIMER_REAL, &it, NULL);
}

static void usage(void) {
    fprintf(stderr, "usage: wtool [--url URL] [--timeout S] "
                    "declare|delete|publish|depth|drain|get QUEUE [OPTIONS]\n");
    exit(1);
}

/* Parses a whole decimal integer >= min, or dies naming the option. */
static long long parse_int(const char *opt, const char *text, long long min) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < min)
        die("%s needs an integer >= %lld, got '%s'", opt, min, text);
    return v;
}

static const char *need_value(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) die("%s needs a value", argv[*i]);
    return argv[++*i];
}

static void parse_args(int argc, char **argv, struct options *o) {
    memset(o, 0, sizeof *o);
    o->url = getenv("WARREN_TEST_URL");
    o->prefix = "m";
    o->body_size = -1;
    o->count = -1;
    o->max = -1;
    o->timeout = 120;
    current_step = "arguments";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--url") == 0) {
            o->url = need_value(argc, argv, &i);
        } else if (strcmp(a, "--timeout") == 0) {
            const char *v = need_value(argc, argv, &i);
            char *end;
            o->timeout = strtod(v, &end);
            if (end == v || *end != '\0' || o->timeout < 0)
                die("--timeout needs seconds >= 0, got '%s'", v);
        } else if (strcmp(a, "--dead-letter") == 0) {
            o->dead_letter = need_value(argc, argv, &i);
        } else if (strcmp(a, "--fresh") == 0) {
            o->fresh = 1;
        } else if (strcmp(a, "--type") == 0) {
            o->queue_type = need_value(argc, argv, &i);
        } else if (strcmp(a, "--count") == 0) {
            o->count = parse_int(a, need_value(argc, argv, &i), 0);
        } else if (strcmp(a, "--prefix") == 0) {
            o->prefix = need_value(argc, argv, &i);
        } else if (strcmp(a, "--body") == 0) {
            o->body = need_value(argc, argv, &i);
        } else if (strcmp(a, "--body-file") == 0) {
            o->body_file = need_value(argc, argv, &i);
        } else if (strcmp(a, "--body-size") == 0) {
            o->body_size = parse_int(a, need_value(argc, argv, &i), 0);
        } else if (strcmp(a, "--expiration") == 0) {
            o->expiration = need_value(argc, argv, &i);
            parse_int(a, o->expiration, 0);
        } else if (strcmp(a, "--max") == 0) {
            o->max = parse_int(a, need_value(argc, argv, &i), 0);
        } else if (strcmp(a, "--header") == 0) {
            const char *kv = need_value(argc, argv, &i);
            const char *eq = strchr(kv, '=');
            if (eq == NULL || eq == kv) die("--header needs K=V, got '%s'", kv);
            if (o->nheaders == MAX_HEADERS) die("at most %d --header options", MAX_HEADERS);
            o->header_keys[o->nheaders] = strndup(kv, (size_t)(eq - kv));
            o->header_values[o->nheaders] = strdup(eq + 1);
            o->nheaders++;
        } else if (strcmp(a, "--nested-header") == 0) {
            const char *kv = need_value(argc, argv, &i);
            const char *eq = strchr(kv, '=');
            if (eq == NULL || eq == kv) die("--nested-header needs K=DEPTH, got '%s'", kv);
            free(o->nested_key);
            o->nested_key = strndup(kv, (size_t)(eq - kv));
            o->nested_depth = parse_int(a, eq + 1, 1);
        } else if (strncmp(a, "--", 2) == 0 && a[2] != '\0') {
            die("unknown option '%s'", a);
        } else if (o->command == NULL) {
            o->command = a;
        } else if (o->queue == NULL) {
            o->queue = a;
        } else {
            die("unexpected argument '%s'", a);
        }
    }
    if (o->command == NULL || o->queue == NULL) usage();
    if (o->url == NULL || o->url[0] == '\0') die("no broker: pass --url or set WARREN_TEST_URL");
    if ((o->body != NULL) + (o->body_file != NULL) + (o->body_size >= 0) > 1)
        die("give only one of --body, --body-file, --body-size");
}

/* ---------------------------------------------------------------- connection */

static const char *server_error(amqp_rpc_reply_t r, char *buf, size_t n) {
    if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_t *m = r.reply.decoded;
        snprintf(buf, n, "channel closed %u: %.*s", m->reply_code, (int)m->reply_text.len,
                 (const char *)m->reply_text.bytes);
    } else if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_t *m = r.reply.decoded;
        snprintf(buf, n, "connection closed %u: %.*s", m->reply_code, (int)m->reply_text.len,
                 (const char *)m->reply_text.bytes);
    } else {
        snprintf(buf, n, "unexpected server method 0x%08" PRIx32, r.reply.id);
    }
    return buf;
}

/* Dies with a readable line unless the RPC reply is normal. */
static void check_reply(amqp_rpc_reply_t r, const char *what) {
    char buf[512];
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return;
    case AMQP_RESPONSE_NONE:
        die("%s: missing RPC reply", what);
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        die("%s: %s", what, amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        die("%s: %s", what, server_error(r, buf, sizeof buf));
        break;
    }
}

static void check_status(int status, const char *what) {
    if (status != AMQP_STATUS_OK) die("%s: %s", what, amqp_error_string2(status));
}

/* Opens a connection and channel CHANNEL; dies with one line on any failure. */
static amqp_connection_state_t connect_broker(const char *url) {
    current_step = "connect";
    char *copy = strdup(url);
    struct amqp_connection_info ci;
    amqp_default_connection_info(&ci);
    if (copy == NULL || amqp_parse_url(copy, &ci) != AMQP_STATUS_OK)
        die("cannot parse URL '%s'", url);
    /* "amqp://host/" names the empty vhost; nobody means that, so take the default one. */
    if (ci.vhost == NULL || ci.vhost[0] == '\0') ci.vhost = "/";

    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock;
    if (ci.ssl) {
        sock = amqp_ssl_socket_new(conn);
        if (sock != NULL) {
            const char *ca = getenv("WARREN_TEST_CACERT");
            if (ca != NULL && ca[0] != '\0')
                check_status(amqp_ssl_socket_set_cacert(sock, ca), "TLS CA certificate");
            else {
                amqp_ssl_socket_set_verify_peer(sock, 0);
                amqp_ssl_socket_set_verify_hostname(sock, 0);
            }
        }
    } else {
        sock = amqp_tcp_socket_new(conn);
    }
    if (sock == NULL) die("cannot create socket");
    struct timeval tv = {.tv_sec = 10, .tv_usec = 0};
    int status = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
    if (status != AMQP_STATUS_OK)
        die("cannot connect to %s:%d: %s", ci.host, ci.port, amqp_error_string2(status));
    check_reply(
        amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password),
        "login");
    amqp_channel_open(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");
    free(copy);
    return conn;
}

static void disconnect(amqp_connection_state_t conn) {
    current_step = "close";
    check_reply(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS), "channel.close");
    check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS), "connection.close");
    amqp_destroy_connection(conn);
}

/* ---------------------------------------------------------------- queues */

static void delete_queue(amqp_connection_state_t conn, const char *queue) {
    current_step = "delete";
    amqp_queue_delete(conn, CHANNEL, amqp_cstring_bytes(queue), 0, 0);
    check_reply(amqp_get_rpc_reply(conn), queue);
}

static void declare_queue(amqp_connection_state_t conn, const char *queue, amqp_table_t args) {
    current_step = "declare";
    amqp_queue_declare(conn, CHANNEL, amqp_cstring_bytes(queue), 0, 1, 0, 0, args);
    check_reply(amqp_get_rpc_reply(conn), queue);
}

static int cmd_declare(amqp_connection_state_t conn, const struct options *o) {
    if (o->fresh) {
        delete_queue(conn, o->queue);
        if (o->dead_letter != NULL) delete_queue(conn, o->dead_letter);
    }
    amqp_table_entry_t entries[3];
    int n = 0;
    if (o->dead_letter != NULL) {
        declare_queue(conn, o->dead_letter, amqp_empty_table);
        entries[n].key = amqp_cstring_bytes("x-dead-letter-exchange");
        entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
        entries[n++].value.value.bytes = amqp_cstring_bytes("");
        entries[n].key = amqp_cstring_bytes("x-dead-letter-routing-key");
        entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
        entries[n++].value.value.bytes = amqp_cstring_bytes(o->dead_letter);
    }
    if (o->queue_type != NULL) {
        entries[n].key = amqp_cstring_bytes("x-queue-type");
        entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
        entries[n++].value.value.bytes = amqp_cstring_bytes(o->queue_type);
    }
    amqp_table_t args = {.num_entries = n, .entries = entries};
    declare_queue(conn, o->queue, n > 0 ? args : amqp_empty_table);
    return 0;
}

static int cmd_delete(amqp_connection_state_t conn, const struct options *o) {
    delete_queue(conn, o->queue);
    return 0;
}

static int cmd_depth(amqp_connection_state_t conn, const struct options *o) {
    current_step = "depth";
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(conn, CHANNEL, amqp_cstring_bytes(o->queue), 1,
                                                     0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), o->queue);
    printf("%" PRIu32 " %" PRIu32 "\n", ok->message_count, ok->consumer_count);
    return 0;
}

/* ---------------------------------------------------------------- publish */

/* Reads a whole file, binary-safe. */
static amqp_bytes_t read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die("%s: %s", path, strerror(errno));
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (buf == NULL) die("out of memory reading %s", path);
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap) break;
        cap *= 2;
        buf = realloc(buf, cap);
    }
    if (ferror(f)) die("%s: read error", path);
    fclose(f);
    return (amqp_bytes_t){.len = len, .bytes = buf};
}

/*
 * The body every message of this run carries; --body-size bytes are i*31 % 256, NULs included.
 * *owned is set when the caller must free the bytes.
 */
static amqp_bytes_t make_body(const struct options *o, int *owned) {
    *owned = o->body_file != NULL || o->body_size >= 0;
    current_step = "publish";
    if (o->body_file != NULL) return read_file(o->body_file);
    if (o->body_size >= 0) {
        size_t n = (size_t)o->body_size;
        unsigned char *buf = malloc(n > 0 ? n : 1);
        if (buf == NULL) die("out of memory for a %zu byte body", n);
        for (size_t i = 0; i < n; i++)
            buf[i] = (unsigned char)(i * 31 % 256);
        return (amqp_bytes_t){.len = n, .bytes = buf};
    }
    return amqp_cstring_bytes(o->body != NULL ? o->body : "");
}

/* Confirm bookkeeping: state[tag] for delivery tags 1..count; "low" is the first unconfirmed. */
struct confirms {
    unsigned char *state; /* 0 outstanding, 1 acked, 2 nacked */
    uint64_t count;
    uint64_t low;
    uint64_t outstanding;
    uint64_t nacked;
    uint64_t returned;
};

static void confirm_one(struct confirms *c, uint64_t tag, unsigned char how) {
    if (tag == 0 || tag > c->count || c->state[tag] != 0) return;
    c->state[tag] = how;
    c->outstanding--;
    if (how == 2) c->nacked++;
}

/* Applies a basic.ack/basic.nack, honouring "multiple" (all unconfirmed tags up to tag). */
static void confirm(struct confirms *c, uint64_t tag, int multiple, unsigned char how) {
    if (tag > c->count) die("confirm for unknown delivery tag %" PRIu64, tag);
    if (multiple) {
        for (uint64_t t = c->low; t <= tag; t++)
            confirm_one(c, t, how);
    } else {
        confirm_one(c, tag, how);
    }
    while (c->low <= c->count && c->state[c->low] != 0)
        c->low++;
}

/* Waits for one frame from the broker and applies it: confirms, returns, or a fatal close. */
static void handle_one_frame(amqp_connection_state_t conn, struct confirms *c) {
    amqp_frame_t frame;
    check_status(amqp_simple_wait_frame(conn, &frame), "waiting for confirms");
    if (frame.frame_type != AMQP_FRAME_METHOD) return;
    amqp_method_t *m = &frame.payload.method;
    switch (m->id) {
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *ack = m->decoded;
        confirm(c, ack->delivery_tag, ack->multiple, 1);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *nack = m->decoded;
        confirm(c, nack->delivery_tag, nack->multiple, 2);
        break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        /* The returned content follows; it is confirmed (acked) afterwards like any other. */
        amqp_message_t msg;
        check_reply(amqp_read_message(conn, frame.channel, &msg, 0), "reading a returned message");
        amqp_destroy_message(&msg);
        c->returned++;
        break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
        amqp_channel_close_t *cl = m->decoded;
        die("channel closed %u: %.*s", cl->reply_code, (int)cl->reply_text.len,
            (const char *)cl->reply_text.bytes);
        break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_connection_close_t *cl = m->decoded;
        die("connection closed %u: %.*s", cl->reply_code, (int)cl->reply_text.len,
            (const char *)cl->reply_text.bytes);
        break;
    }
    default:
        break;
    }
    amqp_maybe_release_buffers(conn);
}

/* The headers of --header and --nested-header; levels holds the nested
 * arrays (the caller frees it). */
static amqp_table_t make_headers(const struct options *o, amqp_table_entry_t *entries,
                                 amqp_field_value_t **levels) {
    int n = 0;
    for (; n < o->nheaders; n++) {
        entries[n].key = amqp_cstring_bytes(o->header_keys[n]);
        entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
        entries[n].value.value.bytes = amqp_cstring_bytes(o->header_values[n]);
    }
    *levels = NULL;
    if (o->nested_key) {
        amqp_field_value_t *l = calloc((size_t)o->nested_depth + 1, sizeof *l);
        if (l == NULL) die("out of memory for %lld nested arrays", o->nested_depth);
        for (long long i = 0; i < o->nested_depth; i++) {
            l[i].kind = AMQP_FIELD_KIND_ARRAY;
            l[i].value.array = (amqp_array_t){1, &l[i + 1]};
        }
        l[o->nested_depth].kind = AMQP_FIELD_KIND_UTF8;
        l[o->nested_depth].value.bytes = amqp_cstring_bytes("bottom");
        entries[n].key = amqp_cstring_bytes(o->nested_key);
        entries[n].value = l[0];
        n++;
        *levels = l;
    }
    return (amqp_table_t){.num_entries = n, .entries = entries};
}

/*
 * Publishes --count persistent, mandatory messages with ids PREFIX1..PREFIXN under publisher
 * confirms, keeping a bounded window outstanding. Fails if any message was nacked or returned.
 */
static int cmd_publish(amqp_connection_state_t conn, const struct options *o) {
    current_step = "publish";
    if (o->count < 0) die("--count N is required");
    int body_owned;
    amqp_bytes_t body = make_body(o, &body_owned);

    amqp_confirm_select(conn, CHANNEL);
    check_reply(amqp_get_rpc_reply(conn), "confirm.select");

    uint64_t window = CONFIRM_WINDOW;
    if (body.len > 0 && CONFIRM_WINDOW_BYTES / body.len < window)
        window = CONFIRM_WINDOW_BYTES / body.len;
    if (window < 1) window = 1;

    struct confirms c = {.count = (uint64_t)o->count, .low = 1};
    c.state = calloc((size_t)c.count + 1, 1);
    if (c.state == NULL) die("out of memory for %" PRIu64 " confirms", c.count);

    amqp_table_entry_t entries[MAX_HEADERS + 1];
    amqp_field_value_t *levels = NULL;
    amqp_basic_properties_t props;
    memset(&props, 0, sizeof props);
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
    props.delivery_mode = 2;
    if (o->nheaders > 0 || o->nested_key) {
        props._flags |= AMQP_BASIC_HEADERS_FLAG;
        props.headers = make_headers(o, entries, &levels);
    }
    if (o->expiration != NULL) {
        props._flags |= AMQP_BASIC_EXPIRATION_FLAG;
        props.expiration = amqp_cstring_bytes(o->expiration);
    }

    size_t idcap = strlen(o->prefix) + 32;
    char *id = malloc(idcap);
    if (id == NULL) die("out of memory");
    amqp_bytes_t routing_key = amqp_cstring_bytes(o->queue);
    for (uint64_t i = 1; i <= c.count; i++) {
        snprintf(id, idcap, "%s%" PRIu64, o->prefix, i);
        props.message_id = amqp_cstring_bytes(id);
        int status =
            amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, routing_key, 1, 0, &props, body);
        check_status(status, "basic.publish");
        c.outstanding++;
        /* Full window: wait until half of it is confirmed, so publishing stays pipelined. */
        if (c.outstanding >= window) {
            while (c.outstanding > window / 2)
                handle_one_frame(conn, &c);
        }
    }
    while (c.outstanding > 0)
        handle_one_frame(conn, &c);
    free(id);
    free(c.state);
    free(levels);
    if (body_owned) free(body.bytes);
    if (c.nacked > 0 || c.returned > 0)
        die("%" PRIu64 " of %" PRIu64 " messages nacked, %" PRIu64 " returned (unroutable)",
            c.nacked, c.count, c.returned);
    return 0;
}

/* ---------------------------------------------------------------- drain and get */

static int64_t field_int(const amqp_field_value_t *v) {
    switch (v->kind) {
    case AMQP_FIELD_KIND_I8:
        return v->value.i8;
    case AMQP_FIELD_KIND_U8:
        return v->value.u8;
    case AMQP_FIELD_KIND_I16:
        return v->value.i16;
    case AMQP_FIELD_KIND_U16:
        return v->value.u16;
    case AMQP_FIELD_KIND_I32:
        return v->value.i32;
    case AMQP_FIELD_KIND_U32:
        return v->value.u32;
    case AMQP_FIELD_KIND_I64:
        return v->value.i64;
    case AMQP_FIELD_KIND_U64:
        return (int64_t)v->value.u64;
    default:
        return 0;
    }
}

static const amqp_field_value_t *table_get(const amqp_table_t *t, const char *key) {
    size_t n = strlen(key);
    for (int i = 0; i < t->num_entries; i++) {
        const amqp_bytes_t *k = &t->entries[i].key;
        if (k->len == n && memcmp(k->bytes, key, n) == 0) return &t->entries[i].value;
    }
    return NULL;
}

/* The "count" of the first x-death entry (the most recent dead-lettering), or 0. */
static int64_t xdeath_count(const amqp_basic_properties_t *p) {
    if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG)) return 0;
    const amqp_field_value_t *xd = table_get(&p->headers, "x-death");
    if (xd == NULL || xd->kind != AMQP_FIELD_KIND_ARRAY || xd->value.array.num_entries < 1)
        return 0;
    const amqp_field_value_t *first = &xd->value.array.entries[0];
    if (first->kind != AMQP_FIELD_KIND_TABLE) return 0;
    const amqp_field_value_t *count = table_get(&first->value.table, "count");
    return count != NULL ? field_int(count) : 0;
}

/*
 * basic.get one message (no-ack false) and read its content; returns 0 if the queue is empty.
 * On 1, *msg must be destroyed and *tag acked by the caller.
 */
static int get_one(amqp_connection_state_t conn, const char *queue, amqp_message_t *msg,
                   uint64_t *tag, int *redelivered) {
    amqp_rpc_reply_t r = amqp_basic_get(conn, CHANNEL, amqp_cstring_bytes(queue), 0);
    check_reply(r, queue);
    if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD) return 0;
    if (r.reply.id != AMQP_BASIC_GET_OK_METHOD)
        die("%s: unexpected reply 0x%08" PRIx32 " to basic.get", queue, r.reply.id);
    amqp_basic_get_ok_t *ok = r.reply.decoded;
    *tag = ok->delivery_tag;
    *redelivered = ok->redelivered;
    check_reply(amqp_read_message(conn, CHANNEL, msg, 0), "reading message content");
    return 1;
}

static void ack(amqp_connection_state_t conn, uint64_t tag) {
    check_status(amqp_basic_ack(conn, CHANNEL, tag, 0), "basic.ack");
}

static int cmd_drain(amqp_connection_state_t conn, const struct options *o) {
    current_step = "drain";
    for (long long n = 0; o->max < 0 || n < o->max; n++) {
        amqp_message_t msg;
        uint64_t tag;
        int redelivered;
        if (!get_one(conn, o->queue, &msg, &tag, &redelivered)) break;
        const amqp_basic_properties_t *p = &msg.properties;
        if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG && p->message_id.len > 0)
            printf("%.*s", (int)p->message_id.len, (const char *)p->message_id.bytes);
        else
            fputs("-", stdout);
        printf(" %d %zu %" PRId64 "\n", redelivered ? 1 : 0, msg.body.len, xdeath_count(p));
        ack(conn, tag);
        amqp_destroy_message(&msg);
        amqp_maybe_release_buffers(conn);
    }
    if (fflush(stdout) != 0) die("writing stdout: %s", strerror(errno));
    return 0;
}

static int cmd_get(amqp_connection_state_t conn, const struct options *o) {
    current_step = "get";
    amqp_message_t msg;
    uint64_t tag;
    int redelivered;
    if (!get_one(conn, o->queue, &msg, &tag, &redelivered)) return 2;
    if ((msg.body.len && fwrite(msg.body.bytes, 1, msg.body.len, stdout) != msg.body.len) ||
        fflush(stdout) != 0)
        die("writing stdout: %s", strerror(errno));
    ack(conn, tag);
    amqp_destroy_message(&msg);
    return 0;
}

/* ---------------------------------------------------------------- main */

struct command {
    const char *name;
    int (*run)(amqp_connection_state_t, const struct options *);
};

static const struct command commands[] = {
    {"declare", cmd_declare}, {"delete", cmd_delete}, {"publish", cmd_publish},
    {"depth", cmd_depth},     {"drain", cmd_drain},   {"get", cmd_get},
};

int main(int argc, char **argv) {
    struct options o;
    parse_args(argc, argv, &o);
    const struct command *cmd = NULL;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(commands[i].name, o.command) == 0) cmd = &commands[i];
    }
    if (cmd == NULL) die("unknown command '%s'", o.command);
    signal(SIGPIPE, SIG_IGN);
    arm_watchdog(o.timeout);

    amqp_connection_state_t conn = connect_broker(o.url);
    int rc = cmd->run(conn, &o);
    disconnect(conn);
    free(o.nested_key);
    for (int i = 0; i < o.nheaders; i++) {
        free(o.header_keys[i]);
        free(o.header_values[i]);
    }
    return rc;
}
