/* warren.publish, warren.reply and warren.retry: the Lua face of the
 * publisher. Each yields the job until the broker confirms. */
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "warren/config.h"
#include "warren/context.h"
#include "warren/job.h"
#include "warren/log.h"
#include "warren/lua_api.h"
#include "warren/publisher.h"
#include "warren/retry.h"
#include "warren/stats.h"

#define MAX_DEPTH 16

/* A job waiting for a confirm. */
typedef struct confirm_wait {
    wr_job *job;
    wr_publisher *pub;
    uint64_t id; /* the publisher's handle */
    bool retry;  /* the original is acked on confirm, requeued on failure */
    wr_stats *stats;
} confirm_wait;

/* Protected (wr_job_results): true, or nil and the error (argument 1). */
static int push_confirm(lua_State *L) {
    const char *err = lua_touserdata(L, 1);
    if (!err) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

static void confirmed(void *ctx, const char *err) {
    confirm_wait *w = ctx;
    wr_job *j = w->job;
    if (w->retry) wr_job_decide(j, err ? WR_OUT_REQUEUE : WR_OUT_ACK);
    if (w->stats) {
        if (err)
            w->stats->publishes_failed++;
        else
            w->stats->publishes_ok++;
    }
    free(w);
    wr_job_resume_results(j, wr_job_results(j, push_confirm, (void *)err), "its publish");
}

static void cancel_wait(wr_job *j, void *data) {
    (void)j;
    confirm_wait *w = data;
    wr_publisher_forget(w->pub, w->id);
    free(w);
}

/* The context of the state, from the vm each function has as its upvalue;
 * a job runs only where there is one. */
static const wr_ctx *context(lua_State *L) {
    const wr_vm *vm = lua_touserdata(L, lua_upvalueindex(1));
    return vm->ctx;
}

static int pool_gc(lua_State *L) {
    empty_amqp_pool(lua_touserdata(L, 1));
    return 0;
}

/* A pool for the message being built, owned by a userdata on the stack so
 * that a Lua error half-way through frees it too. */
static amqp_pool_t *new_pool(lua_State *L) {
    amqp_pool_t *pool = lua_newuserdatauv(L, sizeof *pool, 0);
    init_amqp_pool(pool, 1024);
    if (luaL_newmetatable(L, "warren.pool")) {
        lua_pushcfunction(L, pool_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return pool;
}

/* Queues m and yields until the broker answers; returns nil, err at once
 * when it cannot be published. The publisher keeps a copy, so the pool is
 * emptied before yielding. */
static int send_and_wait(lua_State *L, wr_job *j, wr_publisher *pub, const wr_message *m,
                         amqp_pool_t *pool, bool retry) {
    char err[300] = "out of memory";
    confirm_wait *w = calloc(1, sizeof *w);
    uint64_t id = w ? wr_publisher_send(pub, m, confirmed, w, err, sizeof err) : 0;
    empty_amqp_pool(pool);
    wr_stats *stats = context(L)->stats;
    if (!id) {
        free(w);
        if (stats) stats->publishes_failed++;
        if (retry) wr_job_decide(j, WR_OUT_REQUEUE);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    w->job = j;
    w->pub = pub;
    w->id = id;
    w->retry = retry;
    w->stats = stats;
    wr_job_wait(j, WR_WAIT_CONFIRM, cancel_wait, w);
    return lua_yield(L, 0);
}

static amqp_bytes_t lua_bytes(lua_State *L, int idx) {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    return (amqp_bytes_t){len, (void *)s};
}

static void to_field(lua_State *L, int idx, amqp_field_value_t *v, amqp_pool_t *pool, int depth);

/* Converts the Lua table at idx to an AMQP table (string keys) or, when it
 * is a sequence, an array. Memory comes from pool. */
static void to_table(lua_State *L, int idx, amqp_field_value_t *v, amqp_pool_t *pool, int depth) {
    if (depth > MAX_DEPTH) luaL_error(L, "headers nest deeper than %d", MAX_DEPTH);
    idx = lua_absindex(L, idx);
    luaL_checkstack(L, 4, "headers");
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
    if (n > 0) {
        v->kind = AMQP_FIELD_KIND_ARRAY;
        v->value.array.num_entries = (int)n;
        v->value.array.entries = amqp_pool_alloc(pool, (size_t)n * sizeof(amqp_field_value_t));
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            to_field(L, -1, &v->value.array.entries[i - 1], pool, depth + 1);
            lua_pop(L, 1);
        }
        return;
    }
    int count = 0;
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1))
        count++;
    v->kind = AMQP_FIELD_KIND_TABLE;
    v->value.table.num_entries = 0;
    v->value.table.entries =
        amqp_pool_alloc(pool, (size_t)(count ? count : 1) * sizeof(amqp_table_entry_t));
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING) luaL_error(L, "header names must be strings");
        amqp_table_entry_t *e = &v->value.table.entries[v->value.table.num_entries++];
        e->key = lua_bytes(L, -2);
        to_field(L, -1, &e->value, pool, depth + 1);
    }
}

static void to_field(lua_State *L, int idx, amqp_field_value_t *v, amqp_pool_t *pool, int depth) {
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
        v->kind = AMQP_FIELD_KIND_BOOLEAN;
        v->value.boolean = lua_toboolean(L, idx);
        break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            v->kind = AMQP_FIELD_KIND_I64;
            v->value.i64 = (int64_t)lua_tointeger(L, idx);
        } else {
            v->kind = AMQP_FIELD_KIND_F64;
            v->value.f64 = (double)lua_tonumber(L, idx);
        }
        break;
    case LUA_TSTRING:
        v->kind = AMQP_FIELD_KIND_UTF8;
        v->value.bytes = lua_bytes(L, idx);
        break;
    case LUA_TTABLE:
        to_table(L, idx, v, pool, depth);
        break;
    default:
        luaL_error(L, "a header value cannot be a %s", luaL_typename(L, idx));
    }
}

static const struct {
    const char *name;
    amqp_flags_t flag;
    size_t offset;
} string_props[] = {
    {"content_type", AMQP_BASIC_CONTENT_TYPE_FLAG, offsetof(amqp_basic_properties_t, content_type)},
    {"content_encoding", AMQP_BASIC_CONTENT_ENCODING_FLAG,
     offsetof(amqp_basic_properties_t, content_encoding)},
    {"correlation_id", AMQP_BASIC_CORRELATION_ID_FLAG,
     offsetof(amqp_basic_properties_t, correlation_id)},
    {"reply_to", AMQP_BASIC_REPLY_TO_FLAG, offsetof(amqp_basic_properties_t, reply_to)},
    {"expiration", AMQP_BASIC_EXPIRATION_FLAG, offsetof(amqp_basic_properties_t, expiration)},
    {"message_id", AMQP_BASIC_MESSAGE_ID_FLAG, offsetof(amqp_basic_properties_t, message_id)},
    {"type", AMQP_BASIC_TYPE_FLAG, offsetof(amqp_basic_properties_t, type)},
    {"user_id", AMQP_BASIC_USER_ID_FLAG, offsetof(amqp_basic_properties_t, user_id)},
    {"app_id", AMQP_BASIC_APP_ID_FLAG, offsetof(amqp_basic_properties_t, app_id)},
};

/* A message id for messages published without one: returns are matched
 * by it, and consumers downstream can deduplicate with it. */
static void ensure_message_id(lua_State *L, amqp_basic_properties_t *p) {
    static unsigned long long counter;
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) return;
    lua_pushfstring(L, "warren-%d-%I", (int)getpid(), (lua_Integer)++counter);
    p->message_id = lua_bytes(L, -1);
    p->_flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
}

void wr_lua_build_message(lua_State *L, wr_message *m, amqp_pool_t *pool) {
    luaL_checktype(L, 1, LUA_TTABLE);
    memset(m, 0, sizeof *m);
    lua_getfield(L, 1, "exchange");
    m->exchange = lua_isnil(L, -1) ? amqp_empty_bytes : lua_bytes(L, -1);
    lua_getfield(L, 1, "routing_key");
    m->routing_key = lua_isnil(L, -1) ? amqp_empty_bytes : lua_bytes(L, -1);
    lua_getfield(L, 1, "body");
    if (!lua_isstring(L, -1)) luaL_error(L, "warren.publish: body must be a string");
    m->body = lua_bytes(L, -1);
    lua_getfield(L, 1, "mandatory");
    m->mandatory = lua_isnil(L, -1) || lua_toboolean(L, -1);
    amqp_basic_properties_t *p = &m->props;
    for (size_t i = 0; i < sizeof string_props / sizeof *string_props; i++) {
        lua_getfield(L, 1, string_props[i].name);
        if (lua_isnil(L, -1)) continue;
        if (!lua_isstring(L, -1))
            luaL_error(L, "warren.publish: %s must be a string", string_props[i].name);
        *(amqp_bytes_t *)((char *)p + string_props[i].offset) = lua_bytes(L, -1);
        p->_flags |= string_props[i].flag;
    }
    lua_getfield(L, 1, "persistent");
    p->delivery_mode = lua_isnil(L, -1) || lua_toboolean(L, -1) ? 2 : 1;
    p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    lua_getfield(L, 1, "priority");
    if (!lua_isnil(L, -1)) {
        p->priority = (uint8_t)luaL_checkinteger(L, -1);
        p->_flags |= AMQP_BASIC_PRIORITY_FLAG;
    }
    lua_getfield(L, 1, "timestamp");
    if (!lua_isnil(L, -1)) {
        p->timestamp = (uint64_t)luaL_checkinteger(L, -1);
        p->_flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    }
    lua_getfield(L, 1, "headers");
    if (lua_istable(L, -1)) {
        amqp_field_value_t v;
        to_table(L, -1, &v, pool, 0);
        if (v.kind == AMQP_FIELD_KIND_ARRAY)
            luaL_error(L, "warren.publish: headers must map names");
        p->headers = v.value.table;
        p->_flags |= AMQP_BASIC_HEADERS_FLAG;
    }
    ensure_message_id(L, p);
}

/* `warren try` has no broker: what a job would have published is printed on
 * standard output as a JSON line, {"publish": {...}} (or "reply"). */
static void print_published(const char *fn, const wr_message *m) {
    const amqp_basic_properties_t *p = &m->props;
    char ex[1100], key[1100], id[1600];
    size_t cap = m->body.len * 6 + 8; /* every byte escaped, the quotes, the end */
    char *body = malloc(cap);
    if (!body) {
        wr_error("try: not enough memory to print a message of %zu bytes", m->body.len);
        return;
    }
    wr_json_string(ex, sizeof ex, m->exchange.bytes, m->exchange.len);
    wr_json_string(key, sizeof key, m->routing_key.bytes, m->routing_key.len);
    wr_json_string(id, sizeof id, p->message_id.bytes, p->message_id.len);
    wr_json_string(body, cap, m->body.bytes, m->body.len);
    printf("{\"%s\":{\"exchange\":%s,\"routing_key\":%s,\"message_id\":%s,\"persistent\":%s,"
           "\"body\":%s}}\n",
           fn, ex, key, id, p->delivery_mode == 2 ? "true" : "false", body);
    fflush(stdout);
    free(body);
}

static int publish_table(lua_State *L, const char *fn) {
    wr_job *j = wr_job_need_wait(L, fn);
    amqp_pool_t *pool = new_pool(L);
    wr_message m;
    wr_lua_build_message(L, &m, pool);
    wr_publisher *pub = context(L)->pub;
    if (!pub) {
        print_published(fn, &m);
        lua_pushboolean(L, 1);
        return 1;
    }
    return send_and_wait(L, j, pub, &m, pool, false);
}

static int l_publish(lua_State *L) {
    return publish_table(L, "publish");
}

/* warren.reply(msg, body [, props]): publishes body to msg.reply_to with
 * msg.correlation_id, through the default exchange. */
static int l_reply(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checkstring(L, 2);
    lua_getfield(L, 1, "reply_to");
    if (!lua_isstring(L, -1)) return luaL_error(L, "warren.reply: the message has no reply_to");
    lua_newtable(L);
    if (lua_istable(L, 3)) {
        for (lua_pushnil(L); lua_next(L, 3); lua_pop(L, 1)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, -4);
        }
    }
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "routing_key");
    lua_pushliteral(L, "");
    lua_setfield(L, -2, "exchange");
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "body");
    lua_getfield(L, 1, "correlation_id");
    lua_setfield(L, -2, "correlation_id");
    lua_replace(L, 1);
    lua_settop(L, 1);
    return publish_table(L, "reply");
}

/* warren.retry(seconds): a copy of the message, with its retry count one
 * higher, waits in the delay queue QUEUE.retry.MS and then goes back to the
 * work queue; the original is acked once the broker confirms the copy. Past
 * --max-retries the message is rejected (dead-lettered) instead. */
static int l_retry(lua_State *L) {
    lua_Number seconds = luaL_checknumber(L, 1);
    luaL_argcheck(L, seconds >= 0 && seconds < 86400.0 * 365, 1, "expected seconds");
    wr_job *j = wr_job_need_wait(L, "retry");
    const wr_delivery *d = wr_job_delivery(j);
    const wr_ctx *ctx = context(L);
    const wr_config *cfg = ctx->cfg;
    long retries = wr_retry_count(d);
    int max = cfg ? cfg->max_retries : 0;
    if (retries >= max) {
        wr_job_decide(j, WR_OUT_REJECT);
        wr_warn("retried %d time%s already: rejecting instead", (int)retries,
                wr_plural((unsigned long long)retries));
        lua_pushnil(L);
        lua_pushfstring(L, "no retries left (%d of %d used)", (int)retries, max);
        return 2;
    }
    wr_publisher *pub = ctx->pub;
    if (!pub) {
        wr_info("try: retry %d of %d in %g s", (int)retries + 1, max, (double)seconds);
        wr_job_decide(j, WR_OUT_ACK);
        lua_pushboolean(L, 1);
        return 1;
    }
    long ms = lround(seconds * 1000);
    const char *queue = lua_pushfstring(L, "%s.retry.%d", d->queue, (int)ms);
    amqp_pool_t *pool = new_pool(L);
    wr_message m;
    if (wr_retry_copy(&m, d, d->queue, queue, ms, retries, pool))
        return luaL_error(L, "not enough memory");
    return send_and_wait(L, j, pub, &m, pool, true);
}

const luaL_Reg wr_lua_publish_funcs[] = {
    {"publish", l_publish}, {"reply", l_reply}, {"retry", l_retry}, {NULL, NULL}};
