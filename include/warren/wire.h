/* One AMQP 0-9-1 connection, driven entirely by the event loop: it dials
 * (wr_dial), logs in, moves frames and heartbeats, and closes, and the loop
 * thread never waits on the network. rabbitmq-c serves only as the codec:
 * frames are decoded with amqp_handle_input and encoded with
 * amqp_encode_method and amqp_encode_properties.
 *
 * Writes never block: what the socket does not take now waits in an outbox
 * and goes out when the socket is writable. A broker that stops reading (a
 * memory alarm blocks publishing connections) leaves it waiting there,
 * while the loop goes on. This wire is the only reader of its socket.
 *
 * Owner and cancellation: the owner (the broker's consumer, the publisher)
 * creates one wire and reuses it across connections. wr_wire_open starts a
 * connection; it ends in exactly one `closed` event, reported from the
 * loop's top level, after a failed attempt, a loss, a close the owner asked
 * for, or a protocol error. wr_wire_abort ends it at once without an event.
 * The wire owns its socket, its timers, its dial and its decoder. */
#ifndef WARREN_WIRE_H
#define WARREN_WIRE_H

#include <amqp.h>
#include <ev.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* How a connection ended, or why it could not be made; the exit code at
 * start-up follows from it. */
typedef enum {
    WR_BROKER_OK = 0,           /* closed cleanly: both sides completed close */
    WR_BROKER_UNREACHABLE = -1, /* network, refused, timeout, lost: worth retrying */
    WR_BROKER_REFUSED = -2,   /* wrong credentials, a refused certificate, no access to the vhost */
    WR_BROKER_NO_QUEUE = -3,  /* the queue does not exist, or differs from what --declare asks */
    WR_BROKER_FAILED = -4,    /* any other protocol error */
    WR_BROKER_UNTRUSTED = -5, /* TLS: the broker's certificate did not verify, or no TLS there */
} wr_broker_status;

typedef struct wr_wire wr_wire;

typedef struct wr_wire_events {
    /* Logged in: channels may be opened. */
    void (*ready)(void *ud);
    /* A frame the wire does not handle itself: anything on a channel above
     * 0, and connection.blocked / unblocked. Its memory is valid only
     * during the call. */
    void (*frame)(void *ud, const amqp_frame_t *f);
    /* The connection is over (see the header comment); why is a one-line
     * reason naming the broker. */
    void (*closed)(void *ud, wr_broker_status st, const char *why);
} wr_wire_events;

wr_wire *wr_wire_new(struct ev_loop *loop, const wr_wire_events *ev, void *ud);
void wr_wire_free(wr_wire *w);

/* Starts connecting to url, asking for heartbeat seconds (0: none), with
 * the whole of resolution, connect, TLS and login bounded by timeout
 * seconds. Returns 0, or -1 with a message in err for an invalid URL or no
 * memory (no event follows then). Any earlier connection is aborted. */
int wr_wire_open(wr_wire *w, const char *url, int heartbeat, double timeout, char *err,
                 size_t errlen);

/* The URL of the connection, without the password, for logs. */
const char *wr_wire_where(const wr_wire *w);

/* Queues a method frame. Returns 0, or -1 when the connection cannot take
 * it (not ready, or out of memory: the connection is then lost). */
int wr_wire_method(wr_wire *w, amqp_channel_t ch, amqp_method_number_t id, void *decoded);

/* Body frames at least this large are borrowed rather than copied. */
#define WR_WIRE_BORROW_MIN 16384

/* Queues basic.publish with its header and body frames as one unit. With
 * an owner, large parts of the body are not copied but borrowed: the bytes
 * must stay valid until written, or until wr_wire_detach(w, owner), which
 * the owner calls before they may go. Returns 0, or -1 as wr_wire_method. */
int wr_wire_publish(wr_wire *w, amqp_channel_t ch, amqp_basic_publish_t *m,
                    const amqp_basic_properties_t *props, amqp_bytes_t body, const void *owner);

/* Copies whatever of owner's borrowed bytes is not written yet into the
 * outbox's own memory, so the owner may free them. */
void wr_wire_detach(wr_wire *w, const void *owner);

/* Ends the connection without waiting for the broker: sends
 * connection.close with code (AMQP_UNEXPECTED_FRAME for a broker that broke
 * the protocol) and why, and reports closed(st, why) from the loop's top
 * level. Logs nothing. Safe inside a frame callback. */
void wr_wire_end(wr_wire *w, int code, wr_broker_status st, const char *why);

/* Closes cleanly: connection.close, then closed(WR_BROKER_OK) once the
 * broker answers with close-ok (the broker handles a connection's frames in
 * order, so everything sent before it was processed), or closed with an
 * error after timeout seconds. Returns 0, or -1 when the connection is not
 * ready (no event follows then). */
int wr_wire_close(wr_wire *w, double timeout);

/* Ends the connection now: one last attempt to write what is queued, then
 * the socket is closed. No event follows. */
void wr_wire_abort(wr_wire *w);

/* For a computation that cannot yield to the loop: sends a heartbeat if one
 * is due and takes in what the broker sent, counting it as life, without
 * handling any frame. Never calls back; safe from inside a Lua hook. */
void wr_wire_keepalive(wr_wire *w);

#endif
