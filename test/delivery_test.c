/* Frame assembly without a broker: a delivery must own exact copies of its
 * bytes, whatever the frames' buffers hold afterwards. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "warren/delivery.h"

static amqp_frame_t method(amqp_basic_deliver_t *m) {
    amqp_frame_t f = {0};
    f.frame_type = AMQP_FRAME_METHOD;
    f.channel = 1;
    f.payload.method.id = AMQP_BASIC_DELIVER_METHOD;
    f.payload.method.decoded = m;
    return f;
}

static amqp_frame_t header(amqp_basic_properties_t *p, uint64_t size) {
    amqp_frame_t f = {0};
    f.frame_type = AMQP_FRAME_HEADER;
    f.channel = 1;
    f.payload.properties.body_size = size;
    f.payload.properties.decoded = p;
    return f;
}

static amqp_frame_t body(void *bytes, size_t len) {
    amqp_frame_t f = {0};
    f.frame_type = AMQP_FRAME_BODY;
    f.channel = 1;
    f.payload.body_fragment = (amqp_bytes_t){len, bytes};
    return f;
}

static void assembles_a_multi_frame_binary_body(void) {
    wr_assembler a;
    wr_assembler_init(&a, 2);
    char rk[] = "images";
    amqp_basic_deliver_t m = {
        .delivery_tag = 42, .redelivered = 1, .exchange = amqp_empty_bytes, .routing_key = {6, rk}};
    char idbuf[] = "m-1";
    amqp_table_entry_t e = {.key = amqp_cstring_bytes("x-delivery-count")};
    e.value.kind = AMQP_FIELD_KIND_I64;
    e.value.value.i64 = 3;
    /* rabbitmq-c leaves the fields whose flag is not set uninitialised. */
    amqp_basic_properties_t p;
    memset(&p, 0xA5, sizeof p);
    p._flags = AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_HEADERS_FLAG;
    p.message_id = (amqp_bytes_t){3, idbuf};
    p.headers = (amqp_table_t){1, &e};
    enum { SIZE = 300000 };
    unsigned char *src = malloc(SIZE);
    for (int i = 0; i < SIZE; i++)
        src[i] = (unsigned char)(i * 31);
    wr_delivery *d = NULL;
    amqp_frame_t f = method(&m);
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_PART);
    f = header(&p, SIZE);
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_PART);
    for (size_t off = 0; off < SIZE; off += 131064) {
        size_t n = SIZE - off < 131064 ? SIZE - off : 131064;
        f = body(src + off, n);
        int r = wr_assembler_feed(&a, &f, &d);
        CHECK(r == (off + n == SIZE ? WR_FRAME_DONE : WR_FRAME_PART));
    }
    /* The frames' memory is recycled by rabbitmq-c: scribble over it. */
    memset(rk, 'X', sizeof rk - 1);
    memset(idbuf, 'X', sizeof idbuf - 1);
    CHECK(d != NULL);
    if (d) {
        CHECK(d->tag == 42 && d->redelivered);
        CHECK(d->routing_key.len == 6 && memcmp(d->routing_key.bytes, "images", 6) == 0);
        CHECK(d->props.message_id.len == 3 && memcmp(d->props.message_id.bytes, "m-1", 3) == 0);
        CHECK(d->props.content_type.len == 0 && d->props.reply_to.len == 0);
        const amqp_field_value_t *v = wr_delivery_header(d, "x-delivery-count");
        CHECK(v && v->kind == AMQP_FIELD_KIND_I64 && v->value.i64 == 3);
        for (int i = 0; i < SIZE; i++)
            src[i] = 0;
        unsigned char *got = d->body.bytes;
        int same = d->body.len == SIZE;
        for (int i = 0; same && i < SIZE; i++)
            same = got[i] == (unsigned char)(i * 31);
        CHECK(same);
        wr_delivery_release(&a, d);
    }
    free(src);
    wr_assembler_free(&a);
}

static void completes_an_empty_body_at_the_header(void) {
    wr_assembler a;
    wr_assembler_init(&a, 1);
    amqp_basic_deliver_t m = {.delivery_tag = 1};
    amqp_basic_properties_t p = {0};
    wr_delivery *d = NULL;
    amqp_frame_t f = method(&m);
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_PART);
    f = header(&p, 0);
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_DONE);
    CHECK(d && d->body.len == 0 && d->body.bytes != NULL);
    CHECK(d && wr_delivery_header(d, "anything") == NULL);
    wr_delivery_release(&a, d);
    /* Recycled: the next delivery reuses the same memory. */
    f = method(&m);
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_PART);
    CHECK(a.nfree == 0);
    wr_assembler_free(&a);
}

static void rejects_frames_out_of_order(void) {
    wr_assembler a;
    wr_assembler_init(&a, 1);
    char x = 'x';
    wr_delivery *d = NULL;
    amqp_frame_t f = body(&x, 1);
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_ERROR);
    amqp_basic_deliver_t m = {.delivery_tag = 1};
    amqp_basic_properties_t p = {0};
    f = method(&m);
    wr_assembler_feed(&a, &f, &d);
    f = header(&p, 1);
    wr_assembler_feed(&a, &f, &d);
    char two[2] = "ab";
    f = body(two, 2); /* more bytes than the header announced */
    CHECK(wr_assembler_feed(&a, &f, &d) == WR_FRAME_ERROR);
    CHECK(d == NULL && a.cur == NULL);
    amqp_frame_t other = {0};
    other.frame_type = AMQP_FRAME_METHOD;
    other.payload.method.id = AMQP_BASIC_CANCEL_METHOD;
    CHECK(wr_assembler_feed(&a, &other, &d) == WR_FRAME_IGNORED);
    wr_assembler_free(&a);
}

int main(void) {
    assembles_a_multi_frame_binary_body();
    completes_an_empty_body_at_the_header();
    rejects_frames_out_of_order();
    return REPORT("delivery_test");
}
