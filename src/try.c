#include "warren/try.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "warren/job.h"
#include "warren/lua_api.h"
#include "warren/load.h"
#include "warren/log.h"
#include "warren/retry.h"
#include "warren/http.h"
#include "warren/spawn.h"
#include "warren/vm.h"

int wr_check(const wr_config *cfg) {
    char err[WR_LOAD_ERROR_MAX];
    /* The main chunk only: no loop, nothing waits; the queues of -q are
     * checked for a handler. */
    const wr_ctx nothing = {.cfg = cfg};
    wr_vm_set_memory_limit(cfg->memory_limit);
    wr_vm *vm = wr_load_script(cfg->script, 1, &nothing, err, sizeof err);
    if (!vm) {
        fprintf(stderr, "%s\n", err);
        return WR_EXIT_CONFIG;
    }
    printf("%s: ok\n", cfg->script);
    wr_vm_unref(vm);
    return 0;
}

typedef struct trial {
    const wr_config *cfg;
    int done;
    wr_outcome outcome;
    wr_verdict verdict; /* when the outcome is WR_OUT_FAILED */
    wr_sched *sched;
    bool stopped; /* a signal interrupted the job: run no more bodies */
    ev_signal sigint, sigterm;
} trial;

/* While a job runs, SIGINT or SIGTERM interrupts it as the forced stage of
 * the worker would: its <close> variables run and its children are ended.
 * Between jobs the signals keep their default action. */
static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents) {
    (void)loop, (void)revents;
    trial *t = w->data;
    t->stopped = true;
    wr_sched_interrupt_all(t->sched);
}

/* A failed job: logs what the failure policy would do with its message in
 * the worker, as the worker logs it. */
static void on_done(void *ud, wr_job *job, wr_outcome outcome) {
    trial *t = ud;
    t->done = 1;
    t->outcome = outcome;
    if (outcome != WR_OUT_FAILED) return;
    const wr_delivery *d = wr_job_delivery(job);
    t->verdict = wr_policy_decide(t->cfg->on_error, wr_job_failure(job), wr_retry_count(d),
                                  t->cfg->max_retries);
    char what[160];
    wr_verdict_describe(&t->verdict, what, sizeof what);
    wr_log_job f = wr_delivery_log_fields(d, wr_job_version(job));
    wr_log_for(WR_LOG_WARN, &f, "%s", what);
}

/* The outcome line's word: for a failed job, what the policy decided. */
static const char *name(const trial *t) {
    static const char *const verdicts[] = {[WR_VERDICT_RETRY] = "retry",
                                           [WR_VERDICT_REQUEUE] = "requeue",
                                           [WR_VERDICT_REJECT] = "reject"};
    if (t->outcome == WR_OUT_FAILED) return verdicts[t->verdict.action];
    switch (t->outcome) {
    case WR_OUT_ACK:
        return "ack";
    case WR_OUT_REQUEUE:
        return "requeue";
    case WR_OUT_REJECT:
        return "reject";
    default:
        return "interrupted";
    }
}

/* One message to try: what a broker would deliver. */
typedef struct trial_msg {
    amqp_basic_deliver_t deliver;
    amqp_basic_properties_t props;
    amqp_bytes_t body;
    const char *queue; /* the fixture's queue, else that of -q, or NULL */
} trial_msg;

/* Runs one message to its end; returns 1 when it was acked. */
static int run_one(struct ev_loop *loop, wr_sched *s, trial *t, wr_vm *vm, wr_assembler *a, long n,
                   const trial_msg *msg) {
    char id[32];
    snprintf(id, sizeof id, "try-%ld", n);
    amqp_basic_deliver_t m = msg->deliver;
    amqp_basic_properties_t p = msg->props;
    size_t len = msg->body.len;
    const void *body = msg->body.bytes;
    m.delivery_tag = (uint64_t)n;
    /* The same frames a broker would send, through the same assembler. */
    amqp_frame_t f[3] = {0};
    f[0].frame_type = AMQP_FRAME_METHOD;
    f[0].payload.method.id = AMQP_BASIC_DELIVER_METHOD;
    f[0].payload.method.decoded = &m;
    f[1].frame_type = AMQP_FRAME_HEADER;
    f[1].payload.properties.body_size = len;
    f[1].payload.properties.decoded = &p;
    f[2].frame_type = AMQP_FRAME_BODY;
    f[2].payload.body_fragment = (amqp_bytes_t){len, (void *)body};
    wr_delivery *d = NULL;
    for (int i = 0; i < 3 && !d; i++)
        if (wr_assembler_feed(a, &f[i], &d) == WR_FRAME_ERROR) break;
    char err[256] = "not enough memory";
    if (d) d->queue = msg->queue;
    if (!d || wr_job_start(s, vm, d, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        wr_delivery_release(a, d);
        return 0;
    }
    ev_signal_start(loop, &t->sigint);
    ev_signal_start(loop, &t->sigterm);
    while (!t->done)
        ev_run(loop, EVRUN_ONCE);
    ev_signal_stop(loop, &t->sigint);
    ev_signal_stop(loop, &t->sigterm);
    printf("%s: %s\n", id, name(t));
    fflush(stdout);
    t->done = 0;
    wr_delivery_release(a, d);
    return t->outcome == WR_OUT_ACK;
}

/* A body given on the command line or standard input, as message try-N. */
static int run_body(struct ev_loop *loop, wr_sched *s, trial *t, wr_vm *vm, wr_assembler *a, long n,
                    const char *body, size_t len) {
    char id[32];
    snprintf(id, sizeof id, "try-%ld", n);
    trial_msg m = {
        .deliver = {.exchange = amqp_empty_bytes, .routing_key = amqp_cstring_bytes("try")},
        .props = {._flags = AMQP_BASIC_MESSAGE_ID_FLAG, .message_id = amqp_cstring_bytes(id)},
        .body = {len, (void *)body},
        .queue = t->cfg->nqueues ? t->cfg->queues[0].name : NULL};
    return run_one(loop, s, t, vm, a, n, &m);
}

/* Reads the fixtures file (one JSON object, or JSON lines) into a list of
 * tables warren.publish would accept: "properties" merged in, body_base64
 * decoded, JSON null dropped, and defaults (routing_key "try", message_id
 * "try-N"). Needs lua-cjson. */
static const char fixtures_lua[] =
    "local path, lines = ...\n"
    "local ok, cjson = pcall(require, 'cjson')\n"
    "if not ok then error('reading fixtures needs lua-cjson (Debian package lua-cjson)', 0) end\n"
    "local f, err = io.open(path, 'rb')\n"
    "if not f then error(err, 0) end\n"
    "local text = f:read('a')\n"
    "f:close()\n"
    "local list = {}\n"
    "local function decode(s, where)\n"
    "  local good, v = pcall(cjson.decode, s)\n"
    "  if not good then error(path .. where .. ': ' .. tostring(v), 0) end\n"
    "  if type(v) ~= 'table' then error(path .. where .. ': not a JSON object', 0) end\n"
    "  list[#list + 1] = v\n"
    "end\n"
    "if lines then\n"
    "  local n = 0\n"
    "  for line in (text .. '\\n'):gmatch('([^\\n]*)\\n') do\n"
    "    n = n + 1\n"
    "    if line:match('%S') then decode(line, ':' .. n) end\n"
    "  end\n"
    "else\n"
    "  decode(text, '')\n"
    "end\n"
    "local b64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'\n"
    "local function unbase64(s)\n"
    "  s = s:gsub('[^%w%+/=]', '')\n"
    "  return (s:gsub('=*$', ''):gsub('.', function(c)\n"
    "    local v = b64:find(c, 1, true) - 1\n"
    "    local bits = ''\n"
    "    for i = 5, 0, -1 do bits = bits .. ((v >> i) & 1) end\n"
    "    return bits\n"
    "  end):gsub('%d%d%d%d%d%d%d%d', function(byte) return string.char(tonumber(byte, 2)) end)"
    ":gsub('%d+$', ''))\n"
    "end\n"
    "local function clean(t)\n"
    "  for k, v in pairs(t) do\n"
    "    if v == cjson.null then t[k] = nil elseif type(v) == 'table' then clean(v) end\n"
    "  end\n"
    "end\n"
    "for i, m in ipairs(list) do\n"
    "  clean(m)\n"
    "  if type(m.properties) == 'table' then\n"
    "    for k, v in pairs(m.properties) do if m[k] == nil then m[k] = v end end\n"
    "  end\n"
    "  m.properties = nil\n"
    "  if type(m.body_base64) == 'string' then m.body = unbase64(m.body_base64) end\n"
    "  m.body = m.body or ''\n"
    "  m.routing_key = m.routing_key or 'try'\n"
    "  m.message_id = m.message_id or ('try-' .. i)\n"
    "end\n"
    "return list\n";

/* Protected: the trial_msg (argument 2) of the fixture table (argument 1),
 * its strings left on the stack above it; headers in the pool (argument 3);
 * the trial is argument 4. */
static int fixture_message(lua_State *L) {
    trial_msg *out = lua_touserdata(L, 2);
    amqp_pool_t *pool = lua_touserdata(L, 3);
    const trial *t = lua_touserdata(L, 4);
    lua_settop(L, 1);
    wr_message m;
    wr_lua_build_message(L, &m, pool);
    lua_getfield(L, 1, "queue");
    const char *queue = lua_tostring(L, -1);
    if (!queue && !lua_isnil(L, -1)) return luaL_error(L, "queue: expected a string");
    if (!queue && t->cfg->nqueues) queue = t->cfg->queues[0].name;
    lua_getfield(L, 1, "redelivered");
    *out = (trial_msg){.deliver = {.exchange = m.exchange,
                                   .routing_key = m.routing_key,
                                   .redelivered = lua_toboolean(L, -1)},
                       .props = m.props,
                       .body = m.body,
                       .queue = queue};
    return lua_gettop(L); /* the strings m points to stay on the caller's stack */
}

/* --message / --messages: each fixture in turn, as its message would come
 * from a broker. Returns 0, or an exit code when the fixtures cannot be
 * read (the error on stderr). */
static int run_fixtures(struct ev_loop *loop, wr_sched *s, trial *t, wr_vm *vm, wr_assembler *a,
                        int *all_acked) {
    const wr_config *cfg = t->cfg;
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "warren try: out of memory\n");
        return WR_EXIT_USAGE;
    }
    luaL_openlibs(L);
    int rc = 0;
    if (luaL_loadbuffer(L, fixtures_lua, sizeof fixtures_lua - 1, "=fixtures") != LUA_OK) {
        fprintf(stderr, "warren try: %s\n", lua_tostring(L, -1));
        rc = WR_EXIT_USAGE;
        goto out;
    }
    lua_pushstring(L, cfg->fixtures);
    lua_pushboolean(L, cfg->fixture_lines);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        fprintf(stderr, "warren try: %s\n", lua_tostring(L, -1));
        rc = WR_EXIT_USAGE;
        goto out;
    }
    int list = lua_gettop(L);
    lua_Integer count = luaL_len(L, list);
    for (lua_Integer i = 1; i <= count && !t->stopped; i++) {
        amqp_pool_t pool;
        init_amqp_pool(&pool, 1024);
        trial_msg m;
        int top = lua_gettop(L);
        lua_pushcfunction(L, fixture_message);
        lua_rawgeti(L, list, i);
        lua_pushlightuserdata(L, &m);
        lua_pushlightuserdata(L, &pool);
        lua_pushlightuserdata(L, t);
        if (lua_pcall(L, 4, LUA_MULTRET, 0) != LUA_OK) {
            fprintf(stderr, "warren try: %s: fixture %lld: %s\n", cfg->fixtures, (long long)i,
                    lua_tostring(L, -1));
            empty_amqp_pool(&pool);
            rc = WR_EXIT_USAGE;
            goto out;
        }
        *all_acked &= run_one(loop, s, t, vm, a, (long)i, &m);
        lua_settop(L, top);
        empty_amqp_pool(&pool);
    }
out:
    lua_close(L);
    return rc;
}

int wr_try(const wr_config *cfg) {
    char err[WR_LOAD_ERROR_MAX];
    trial t = {.cfg = cfg};
    /* Not libev's default loop, which reaps every child (see wr_host_run). */
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    wr_sched *s = loop ? wr_sched_new(loop, on_done, &t) : NULL;
    /* No publisher: what a job publishes is only logged. */
    wr_ctx ctx = {.loop = loop, .cfg = cfg};
    wr_vm_set_memory_limit(cfg->memory_limit);
    wr_vm *vm = s ? wr_load_script(cfg->script, 1, &ctx, err, sizeof err) : NULL;
    if (!vm) {
        fprintf(stderr, "%s\n", s ? err : "out of memory");
        wr_sched_free(s);
        if (loop) ev_loop_destroy(loop);
        return WR_EXIT_CONFIG;
    }
    t.sched = s;
    wr_sched_set_job_timeout(s, cfg->job_timeout);
    wr_sched_set_virtual_time(s, cfg->virtual_time);
    ev_signal_init(&t.sigint, signal_cb, SIGINT);
    ev_signal_init(&t.sigterm, signal_cb, SIGTERM);
    t.sigint.data = t.sigterm.data = &t;
    wr_assembler a;
    wr_assembler_init(&a, 1);
    int all_acked = 1, unreadable = 0;
    long n = 0;
    if (cfg->fixtures) {
        unreadable = run_fixtures(loop, s, &t, vm, &a, &all_acked);
    } else if (cfg->nbodies > 0) {
        for (int i = 0; i < cfg->nbodies && !t.stopped; i++)
            all_acked &= run_body(loop, s, &t, vm, &a, ++n, cfg->bodies[i], strlen(cfg->bodies[i]));
    } else {
        if (isatty(0))
            fprintf(stderr, "warren try: reading bodies from standard input, one per line; "
                            "Ctrl-D ends\n");
        char *line = NULL;
        size_t cap = 0;
        ssize_t len;
        while (!t.stopped && (len = getline(&line, &cap, stdin)) >= 0) {
            if (len > 0 && line[len - 1] == '\n') len--;
            all_acked &= run_body(loop, s, &t, vm, &a, ++n, line, (size_t)len);
        }
        free(line);
    }
    wr_assembler_free(&a);
    wr_vm_unref(vm);
    wr_sched_free(s);
    wr_spawn_shutdown();
    wr_http_shutdown();
    ev_loop_destroy(loop);
    if (unreadable) return unreadable;
    if (t.stopped) return WR_EXIT_TEMPFAIL;
    return all_acked ? 0 : 1;
}
