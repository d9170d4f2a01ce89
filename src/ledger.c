#include "warren/ledger.h"

#include <stdlib.h>
#include <string.h>

void wr_ledger_init(wr_ledger *l) {
    memset(l, 0, sizeof *l);
    l->base = l->next = 1;
}

void wr_ledger_free(wr_ledger *l) {
    free(l->state);
    free(l->acks);
    wr_ledger_init(l);
}

void wr_ledger_reset(wr_ledger *l) {
    l->base = l->next = 1;
    l->head = 0;
    l->unsettled = 0;
    l->nacks = 0;
}

static unsigned char *slot(const wr_ledger *l, uint64_t tag) {
    return &l->state[(l->head + (size_t)(tag - l->base)) & (l->cap - 1)];
}

/* Doubles the ring, keeping the tags in order from index 0. */
static int grow(wr_ledger *l) {
    size_t cap = l->cap ? 2 * l->cap : 64;
    unsigned char *s = malloc(cap);
    if (!s) return -1;
    size_t n = (size_t)(l->next - l->base);
    for (size_t i = 0; i < n; i++)
        s[i] = l->state[(l->head + i) & (l->cap - 1)];
    free(l->state);
    l->state = s;
    l->cap = cap;
    l->head = 0;
    return 0;
}

int wr_ledger_receive(wr_ledger *l, uint64_t tag) {
    if (tag != l->next) return -1;
    if ((size_t)(l->next - l->base) == l->cap && grow(l)) return -1;
    l->next++;
    *slot(l, tag) = 0;
    l->unsettled++;
    return 0;
}

int wr_ledger_settle(wr_ledger *l, uint64_t tag, bool ack) {
    if (tag < l->base || tag >= l->next || *slot(l, tag)) return -1;
    if (ack && l->nacks == l->acks_cap) {
        size_t cap = l->acks_cap ? 2 * l->acks_cap : 64;
        uint64_t *a = realloc(l->acks, cap * sizeof *a);
        if (!a) return -1;
        l->acks = a;
        l->acks_cap = cap;
    }
    *slot(l, tag) = 1;
    l->unsettled--;
    if (ack) l->acks[l->nacks++] = tag;
    /* The oldest unsettled tag moves past every settled one. */
    while (l->base < l->next && *slot(l, l->base)) {
        l->head = (l->head + 1) & (l->cap - 1);
        l->base++;
    }
    return 0;
}

bool wr_ledger_pending(const wr_ledger *l) {
    return l->nacks > 0;
}

size_t wr_ledger_collected(const wr_ledger *l) {
    return l->nacks;
}

void wr_ledger_flush(wr_ledger *l, uint64_t *multiple, uint64_t *singles, size_t *nsingles) {
    uint64_t below = 0;
    size_t n = 0;
    for (size_t i = 0; i < l->nacks; i++) {
        uint64_t t = l->acks[i];
        if (t < l->base)
            below = t > below ? t : below;
        else
            singles[n++] = t;
    }
    *multiple = below;
    *nsingles = n;
    l->nacks = 0;
}

uint64_t wr_ledger_oldest(const wr_ledger *l) {
    return l->base < l->next ? l->base : 0;
}

size_t wr_ledger_unsettled(const wr_ledger *l) {
    return l->unsettled;
}
