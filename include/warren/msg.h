/* The msg table a job gets with its body: routing key, exchange, flags and
 * the AMQP properties, with headers converted to Lua values exactly. */
#ifndef WARREN_MSG_H
#define WARREN_MSG_H

#include <lua.h>

#include "warren/delivery.h"

/* How deep headers may nest (tables and arrays within each other) for a
 * message to reach a job. */
#define WR_HEADER_DEPTH 100

/* Pushes the msg table of a delivery. Raises an error when the headers nest
 * deeper than WR_HEADER_DEPTH or memory runs out: call it in protected mode. */
void wr_push_msg(lua_State *L, const wr_delivery *d);

#endif
