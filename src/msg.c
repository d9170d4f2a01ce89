#include "warren/msg.h"

#include <lauxlib.h>
#include <math.h>

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

/* The headers of every message without any: one empty table per state,
 * read-only, rather than a new one per message. */
static const char no_headers_key = 'h';

static int refuse_header(lua_State *L) {
    return luaL_error(L, "msg.headers is read-only for a message without headers "
                         "(make a new table to publish some)");
}

static void push_no_headers(lua_State *L) {
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &no_headers_key) == LUA_TTABLE) return;
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, refuse_header);
    lua_setfield(L, -2, "__newindex");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &no_headers_key);
}

#define SET_BYTES(flag, field, name)                                                               \
    if (p->_flags & (flag)) {                                                                      \
        push_bytes(L, p->field);                                                                   \
        lua_setfield(L, -2, name);                                                                 \
    }

void wr_push_msg(lua_State *L, const wr_delivery *d) {
    const amqp_basic_properties_t *p = &d->props;
    /* The fields always there, the queue, and each property present. */
    int n = 7 + __builtin_popcount(
                    p->_flags & (AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_CONTENT_ENCODING_FLAG |
                                 AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_PRIORITY_FLAG |
                                 AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG |
                                 AMQP_BASIC_EXPIRATION_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG |
                                 AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_TYPE_FLAG |
                                 AMQP_BASIC_USER_ID_FLAG | AMQP_BASIC_APP_ID_FLAG));
    lua_createtable(L, 0, n + 1); /* and delivery_count, maybe */
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
        push_no_headers(L);
    }
    lua_setfield(L, -2, "headers");
}
