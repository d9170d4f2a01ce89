#include "warren/lua_api.h"

#include <lauxlib.h>
#include <math.h>
#include <string.h>

#include "warren/job.h"
#include "warren/log.h"
#include "warren/spawn.h"

static wr_vm *upvm(lua_State *L) {
    return lua_touserdata(L, lua_upvalueindex(1));
}

wr_job *wr_lua_need_job(lua_State *L, const char *fn) {
    wr_job *j = wr_job_current(L);
    if (!j)
        luaL_error(L,
                   "warren.%s can only be called from a job's own coroutine "
                   "(not at load time nor from a nested coroutine)",
                   fn);
    return j;
}

wr_job *wr_lua_need_wait(lua_State *L, const char *fn) {
    wr_job *j = wr_lua_need_job(L, fn);
    if (j->closing)
        luaL_error(L, "warren.%s cannot wait: the job is over and its <close> handlers are running",
                   fn);
    if (j->co != L || !lua_isyieldable(L))
        luaL_error(L,
                   "warren.%s cannot wait here: it was called through a C function that cannot "
                   "yield (a metamethod, table.sort, string.gsub, ...)",
                   fn);
    return j;
}

static int l_sleep(lua_State *L) {
    lua_Number s = luaL_checknumber(L, 1);
    luaL_argcheck(L, s >= 0 && isfinite(s), 1, "expected a non-negative number of seconds");
    wr_job *j = wr_lua_need_wait(L, "sleep");
    return wr_job_sleep(L, j, (double)s);
}

static int l_draining(lua_State *L) {
    wr_vm *vm = upvm(L);
    lua_pushboolean(L, vm->sched && wr_sched_draining(vm->sched));
    return 1;
}

static int decide(lua_State *L, const char *fn, wr_outcome o) {
    wr_job_decide(wr_lua_need_job(L, fn), o);
    return 0;
}
static int l_ack(lua_State *L) {
    return decide(L, "ack", WR_OUT_ACK);
}
static int l_requeue(lua_State *L) {
    return decide(L, "requeue", WR_OUT_REQUEUE);
}
static int l_reject(lua_State *L) {
    return decide(L, "reject", WR_OUT_REJECT);
}

/* log.<level>(...): the arguments through tostring, separated by spaces. */
static int log_at(lua_State *L, wr_log_level level) {
    if (!wr_log_enabled(level)) return 0;
    int n = lua_gettop(L);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    wr_job *j = wr_job_current(L);
    if (j) {
        amqp_bytes_t id = j->delivery->props.message_id;
        if (id.len) {
            luaL_addchar(&b, '[');
            luaL_addlstring(&b, id.bytes, id.len);
            luaL_addstring(&b, "] ");
        } else {
            lua_pushfstring(L, "[tag %I] ", (lua_Integer)j->delivery->tag);
            luaL_addvalue(&b);
        }
    }
    for (int i = 1; i <= n; i++) {
        if (i > 1) luaL_addchar(&b, ' ');
        luaL_tolstring(L, i, NULL);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    wr_log(level, "%s", lua_tostring(L, -1));
    return 0;
}
static int l_debug(lua_State *L) {
    return log_at(L, WR_LOG_DEBUG);
}
static int l_info(lua_State *L) {
    return log_at(L, WR_LOG_INFO);
}
static int l_warn(lua_State *L) {
    return log_at(L, WR_LOG_WARN);
}
static int l_error(lua_State *L) {
    return log_at(L, WR_LOG_ERROR);
}

static int open_warren(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"sleep", l_sleep},   {"draining", l_draining}, {"ack", l_ack}, {"requeue", l_requeue},
        {"reject", l_reject}, {"spawn", wr_spawn_lua},  {NULL, NULL}};
    static const luaL_Reg logf[] = {
        {"debug", l_debug}, {"info", l_info}, {"warn", l_warn}, {"error", l_error}, {NULL, NULL}};
    wr_vm *vm = lua_touserdata(L, lua_upvalueindex(1));
    lua_newtable(L);
    lua_pushlightuserdata(L, vm);
    luaL_setfuncs(L, funcs, 1);
    lua_pushlightuserdata(L, vm);
    luaL_setfuncs(L, wr_lua_publish_funcs, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, vm);
    luaL_setfuncs(L, logf, 1);
    lua_setfield(L, -2, "log");
    lua_pushinteger(L, (lua_Integer)vm->version);
    lua_setfield(L, -2, "version");
    return 1;
}

/* os.exit would end the worker on the spot: no drain, no settle, children
 * left running. */
static int l_no_exit(lua_State *L) {
    return luaL_error(L, "os.exit is not available to warren scripts: return from handle, or "
                         "raise an error, to end a job");
}

void wr_lua_open(wr_vm *vm) {
    lua_State *L = vm->L;
    if (lua_getglobal(L, "os") == LUA_TTABLE) {
        lua_pushcfunction(L, l_no_exit);
        lua_setfield(L, -2, "exit");
    }
    lua_pop(L, 1);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushlightuserdata(L, vm);
    lua_pushcclosure(L, open_warren, 1);
    lua_call(L, 0, 1);
    lua_setfield(L, -2, "warren");
    lua_pop(L, 1);
}

static void push_bytes(lua_State *L, amqp_bytes_t b) {
    lua_pushlstring(L, b.bytes, b.len);
}

static void push_table(lua_State *L, const amqp_table_t *t, int depth);

/* Pushes a header value; raises an error past WR_HEADER_DEPTH levels of
 * nesting, so a message from anyone never reaches the job altered. */
static void push_field(lua_State *L, const amqp_field_value_t *v, int depth) {
    if (depth > WR_HEADER_DEPTH)
        luaL_error(L, "its headers nest deeper than %d levels", WR_HEADER_DEPTH);
    luaL_checkstack(L, 3, "nested headers");
    switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN:
        lua_pushboolean(L, v->value.boolean);
        break;
    case AMQP_FIELD_KIND_I8:
        lua_pushinteger(L, v->value.i8);
        break;
    case AMQP_FIELD_KIND_U8:
        lua_pushinteger(L, v->value.u8);
        break;
    case AMQP_FIELD_KIND_I16:
        lua_pushinteger(L, v->value.i16);
        break;
    case AMQP_FIELD_KIND_U16:
        lua_pushinteger(L, v->value.u16);
        break;
    case AMQP_FIELD_KIND_I32:
        lua_pushinteger(L, v->value.i32);
        break;
    case AMQP_FIELD_KIND_U32:
        lua_pushinteger(L, v->value.u32);
        break;
    case AMQP_FIELD_KIND_I64:
        lua_pushinteger(L, (lua_Integer)v->value.i64);
        break;
    case AMQP_FIELD_KIND_U64:
        lua_pushinteger(L, (lua_Integer)v->value.u64);
        break;
    case AMQP_FIELD_KIND_TIMESTAMP:
        lua_pushinteger(L, (lua_Integer)v->value.u64);
        break;
    case AMQP_FIELD_KIND_F32:
        lua_pushnumber(L, v->value.f32);
        break;
    case AMQP_FIELD_KIND_F64:
        lua_pushnumber(L, v->value.f64);
        break;
    case AMQP_FIELD_KIND_DECIMAL:
        lua_pushnumber(L, v->value.decimal.value / pow(10, v->value.decimal.decimals));
        break;
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES:
        push_bytes(L, v->value.bytes);
        break;
    case AMQP_FIELD_KIND_TABLE:
        push_table(L, &v->value.table, depth + 1);
        break;
    case AMQP_FIELD_KIND_ARRAY: {
        const amqp_array_t *a = &v->value.array;
        lua_createtable(L, a->num_entries, 0);
        for (int i = 0; i < a->num_entries; i++) {
            push_field(L, &a->entries[i], depth + 1);
            lua_rawseti(L, -2, i + 1);
        }
        break;
    }
    default:
        lua_pushnil(L);
        break; /* void */
    }
}

static void push_table(lua_State *L, const amqp_table_t *t, int depth) {
    luaL_checkstack(L, 4, "nested headers");
    lua_createtable(L, 0, t->num_entries);
    for (int i = 0; i < t->num_entries; i++) {
        push_bytes(L, t->entries[i].key);
        push_field(L, &t->entries[i].value, depth);
        lua_rawset(L, -3);
    }
}

#define SET_BYTES(flag, field, name)                                                               \
    if (p->_flags & (flag)) {                                                                      \
        push_bytes(L, p->field);                                                                   \
        lua_setfield(L, -2, name);                                                                 \
    }

void wr_push_msg(lua_State *L, const wr_delivery *d) {
    const amqp_basic_properties_t *p = &d->props;
    lua_createtable(L, 0, 12);
    push_bytes(L, d->routing_key);
    lua_setfield(L, -2, "routing_key");
    push_bytes(L, d->exchange);
    lua_setfield(L, -2, "exchange");
    lua_pushboolean(L, d->redelivered);
    lua_setfield(L, -2, "redelivered");
    const amqp_field_value_t *retries = wr_delivery_header(d, "x-warren-retries");
    if (retries)
        push_field(L, retries, 1);
    else
        lua_pushinteger(L, 0);
    lua_setfield(L, -2, "retries");
    lua_pushinteger(L, (lua_Integer)d->tag);
    lua_setfield(L, -2, "delivery_tag");
    SET_BYTES(AMQP_BASIC_CONTENT_TYPE_FLAG, content_type, "content_type");
    SET_BYTES(AMQP_BASIC_CONTENT_ENCODING_FLAG, content_encoding, "content_encoding");
    SET_BYTES(AMQP_BASIC_CORRELATION_ID_FLAG, correlation_id, "correlation_id");
    SET_BYTES(AMQP_BASIC_REPLY_TO_FLAG, reply_to, "reply_to");
    SET_BYTES(AMQP_BASIC_EXPIRATION_FLAG, expiration, "expiration");
    SET_BYTES(AMQP_BASIC_MESSAGE_ID_FLAG, message_id, "message_id");
    SET_BYTES(AMQP_BASIC_TYPE_FLAG, type, "type");
    SET_BYTES(AMQP_BASIC_USER_ID_FLAG, user_id, "user_id");
    SET_BYTES(AMQP_BASIC_APP_ID_FLAG, app_id, "app_id");
    if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) {
        lua_pushinteger(L, p->delivery_mode);
        lua_setfield(L, -2, "delivery_mode");
    }
    if (p->_flags & AMQP_BASIC_PRIORITY_FLAG) {
        lua_pushinteger(L, p->priority);
        lua_setfield(L, -2, "priority");
    }
    if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG) {
        lua_pushinteger(L, (lua_Integer)p->timestamp);
        lua_setfield(L, -2, "timestamp");
    }
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
        push_table(L, &p->headers, 1);
        const amqp_field_value_t *count = wr_delivery_header(d, "x-delivery-count");
        if (count) {
            push_field(L, count, 1);
            lua_setfield(L, -3, "delivery_count");
        }
    } else {
        lua_newtable(L);
    }
    lua_setfield(L, -2, "headers");
}
