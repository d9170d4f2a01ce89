-- The worker host: consume, run handle(body, msg) in coroutines, settle
-- each delivery exactly once. Real broker, real warren processes.
local H = require "support.helper"

describe("worker", function()
  after_each(H.stop_all)

  it("handles each of 1000 messages once and acks it, leaving the queue empty", function()
    local q = H.queue("thousand")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg) record(msg.message_id, tostring(msg.redelivered)) end]])
    local ids = H.publish(q, 1000, { prefix = "k", body = "x" })
    local proc = H.worker(script, q, { "--prefetch", "20" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) >= 1000 end, 60, "1000 jobs")
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
    local seen = {}
    for _, r in ipairs(H.records(rec)) do
      assert.is_nil(seen[r[1]], "handled twice: " .. r[1])
      seen[r[1]] = true
      assert.equal("false", r[2])
    end
    for _, id in ipairs(ids) do assert.is_true(seen[id], "not handled: " .. id) end
    assert.equal(1000, #H.records(rec))
    assert.equal(0, (H.depth(q)))
    assert.same({}, H.drain(q))
  end)

  it("passes empty, binary, 1 MiB and 16 MiB bodies to Lua byte for byte", function()
    local q = H.queue("bodies")
    local rec = H.record_file()
    local dir = H.tmpdir()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg)
        local f = assert(io.open(os.getenv("BODY_DIR") .. "/" .. msg.message_id, "wb"))
        f:write(body)
        f:close()
        record(msg.message_id, #body)
      end]])
    local nul = "a\0b\0\0c\255\0"
    H.publish(q, 1, { prefix = "empty", body = "" })
    H.publish(q, 1, { prefix = "nul", body = nul })
    H.publish(q, 1, { prefix = "mib", body_size = 1 << 20 })
    H.publish(q, 1, { prefix = "big", body_size = 16 << 20 })
    local proc = H.worker(script, q, { "--prefetch", "4" },
      { [H.RECORD_ENV] = rec, BODY_DIR = dir })
    H.wait_until(function() return #H.records(rec) == 4 end, 30, "four bodies")
    assert.equal("", H.read_file(dir .. "/empty1"))
    assert.equal(nul, H.read_file(dir .. "/nul1"))
    assert.is_true(H.read_file(dir .. "/mib1") == H.body_bytes(1 << 20), "1 MiB body differs")
    assert.is_true(H.read_file(dir .. "/big1") == H.body_bytes(16 << 20), "16 MiB body differs")
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
    assert.same({}, H.drain(q))
  end)

  -- Replays start/end records in time order: the most jobs running at once.
  local function max_overlap(records)
    local events = {}
    for _, r in ipairs(records) do
      events[#events + 1] = { t = tonumber(r[3]), d = r[1] == "start" and 1 or -1 }
    end
    table.sort(events, function(a, b) return a.t < b.t or (a.t == b.t and a.d < b.d) end)
    local now, most = 0, 0
    for _, e in ipairs(events) do
      now = now + e.d
      if now > most then most = now end
    end
    return most
  end

  local sleeper = H.RECORD_LUA .. [[
    local warren = require "warren"
    function handle(body, msg)
      record("start", msg.message_id, now())
      warren.sleep(tonumber(body))
      record("end", msg.message_id, now())
    end]]

  it("never runs more than --prefetch jobs at once, and that many overlap", function()
    local q = H.queue("prefetch")
    local rec = H.record_file()
    H.publish(q, 15, { body = "0.5" })
    local proc = H.worker(H.script(sleeper), q, { "--prefetch", "5" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 30 end, 20, "15 jobs done")
    assert.equal(5, max_overlap(H.records(rec)))
    assert.equal(0, H.term(proc))
  end)

  it("runs 100 one-second sleeps in about one second at prefetch 100", function()
    local q = H.queue("overlap")
    local rec = H.record_file()
    H.publish(q, 100, { body = "1" })
    local proc = H.worker(H.script(sleeper), q, { "--prefetch", "100" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 200 end, 20, "100 jobs done")
    local first, last = math.huge, 0
    for _, r in ipairs(H.records(rec)) do
      local t = tonumber(r[3])
      if r[1] == "start" then first = math.min(first, t) else last = math.max(last, t) end
    end
    assert.equal(100, max_overlap(H.records(rec)))
    assert.is_true(last - first < 2.0, "took " .. (last - first) .. " s")
    assert.equal(0, H.term(proc))
  end)

  it("lets the script requeue or reject explicitly", function()
    local q, dlq = H.queue("decide", { dead_letter = true })
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        record(msg.message_id, body, tostring(msg.redelivered))
        if body == "reject" then return warren.reject() end
        if body == "requeue" and not msg.redelivered then return warren.requeue() end
      end]])
    H.publish(q, 1, { prefix = "rej", body = "reject" })
    H.publish(q, 1, { prefix = "req", body = "requeue" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 3 and H.depth(q) == 0 end, 10, "settled")
    assert.equal(0, H.term(proc))
    local dead = H.drain(dlq)
    assert.equal(1, #dead)
    assert.equal("rej1", dead[1].id)
    local seen = {}
    for _, r in ipairs(H.records(rec)) do seen[#seen + 1] = r[1] .. " " .. r[3] end
    table.sort(seen)
    assert.same({ "rej1 false", "req1 false", "req1 true" }, seen)
    assert.same({}, H.drain(q))
  end)

  it("gives msg the routing key, flags and AMQP properties", function()
    local q = H.queue("props")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg)
        record(msg.message_id, msg.routing_key, msg.exchange == "" and "default" or msg.exchange,
               msg.delivery_tag, msg.delivery_mode, msg.headers.color, msg.queue)
      end]])
    H.publish(q, 1, { prefix = "p", headers = { color = "blue" } })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "handled")
    local r = H.records(rec)[1]
    assert.same({ "p1", q, "default", "1", "2", "blue", q },
      { r[1], r[2], r[3], r[4], r[5], r[6], r[7] })
    assert.equal(0, H.term(proc))
  end)
end)

describe("bad input", function()
  local good = H.script("function handle() end")
  local host_port = H.url:match("@([^/]+)")

  -- Runs warren and returns its exit code and its one line of error output
  -- (a warning about a retry may come before it).
  local function fails(args)
    local code, out = H.run(args, { timeout = 20 })
    local lines = {}
    for l in out:gmatch("[^\n]+") do
      if not l:match("^%S+ warn ") then lines[#lines + 1] = l end
    end
    assert.equal(1, #lines, "expected one line, got:\n" .. out)
    return code, lines[1]
  end

  it("exits 69 when the broker is unreachable", function()
    local code, line = fails({ "-u", "amqp://guest:guest@127.0.0.1:1/", "-q", "x",
      "--connect-timeout", "0.3", good })
    assert.equal(69, code)
    assert.matches("unreachable", line)
  end)

  it("exits 77 on a wrong password", function()
    local code, line = fails({ "-u", "amqp://guest:wrong@" .. host_port .. "/", "-q", "x", good })
    assert.equal(77, code)
    assert.matches("ACCESS_REFUSED", line)
  end)

  it("exits 77 on an unknown vhost", function()
    local code, line = fails({ "-u", "amqp://guest:guest@" .. host_port .. "/nosuchvhost", "-q",
      "x", good })
    assert.equal(77, code)
    assert.matches("nosuchvhost", line)
  end)

  it("exits 69 when the queue is missing", function()
    local code, line = fails({ "-u", H.url, "-q", H.unique_name("missing"), good })
    assert.equal(69, code)
    assert.matches("not found", line)
    assert.matches("--declare", line, 1, true)
  end)

  it("declares a missing queue with --declare", function()
    local q = H.unique_name("declared")
    local proc = H.start(good, { "-u", H.url, "-q", q, "--declare" })
    H.wait_until(function()
      local ok, _, out = pcall(H.depth, q)
      return ok and select(2, H.depth(q)) == 1
    end, 10, "consumer on the declared queue")
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    H.delete_queue(q)
  end)

  for _, case in ipairs({
    { "a negative prefetch", { "-q", "x", "--prefetch", "-1", good }, 64, "--prefetch" },
    { "a non-numeric timeout", { "-q", "x", "--drain-timeout", "soon", good }, 64, "soon" },
    { "an unknown option", { "-q", "x", "--frobnicate", good }, 64, "--frobnicate" },
    { "a missing queue name", { good }, 64, "--queue" },
    { "a missing script", { "-q", "x", "/nonexistent/job.lua" }, 78, "cannot open" },
  }) do
    it("exits " .. case[3] .. " on " .. case[1], function()
      local code, line = fails(case[2])
      assert.equal(case[3], code)
      assert.matches(case[4], line, 1, true)
    end)
  end

  it("exits 78 with file:line on a syntax error", function()
    local bad = H.script("function handle(body)\n  return body +\nend\n")
    local code, line = fails({ "-u", H.url, "-q", "x", bad })
    assert.equal(78, code)
    assert.matches("job.lua:3:", line, 1, true)
  end)

  it("exits 78 when the script has no handle", function()
    local code, line = fails({ "-u", H.url, "-q", "x", H.script("local x = 1\n") })
    assert.equal(78, code)
    assert.matches("no handle", line, 1, true)
  end)
end)
