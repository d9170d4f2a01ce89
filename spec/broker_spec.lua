-- The loop never waits on the broker: a memory alarm, a black-holed path, a
-- silent host, a re-declared queue and a frozen broker leave jobs, heartbeats
-- and signals going, and exit 0 only when the broker has seen every ack. A
-- host name's addresses are tried in turn.
local H = require "support.helper"

-- Records the largest gap between the ticks of a job that sleeps 0.1 s n times.
local TICKER = [[
  local function tick(n)
    local last = now()
    for i = 1, n do
      warren.sleep(0.1)
      local t = now()
      record("tick", i, t - last)
      last = t
    end
  end
]]

local function ticks(rec)
  local n, gap = 0, 0
  for _, r in ipairs(H.records(rec)) do
    if r[1] == "tick" then
      n = n + 1
      gap = math.max(gap, tonumber(r[3]))
    end
  end
  return n, gap
end

local function has_record(rec, name)
  for _, r in ipairs(H.records(rec)) do
    if r[1] == name then return r end
  end
end

-- messages_unacknowledged of queue, read from the broker.
local function unacked(queue)
  local ok, out = H.ctl("list_queues", "-q", "name", "messages_unacknowledged")
  assert(ok, out)
  for name, n in out:gmatch("(%S+)%s+(%d+)") do
    if name == queue then return tonumber(n) end
  end
  error("no queue " .. queue .. " in:\n" .. out)
end

describe("the broker cannot hold the loop", function()
  after_each(H.stop_all)

  it("goes on acking and consuming under a memory alarm while a publish waits", function()
    local q = H.queue("alarm")
    local out = H.queue("alarm-out")
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "pub", body = "pub" })
    H.publish(q, 1, { prefix = "tick", body = "tick" })
    -- The body is made at load time: building it is the script's own work.
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      local BIG = string.rep("x", 16 * 1024 * 1024)
    ]] .. TICKER .. [[
      function handle(body, msg)
        if body == "pub" then
          local ok, err = warren.publish{ routing_key = "]] .. out .. [[", body = BIG }
          record("published", tostring(ok), tostring(err))
        else
          tick(30)
        end
      end]])
    finally(function() H.ctl("set_vm_memory_high_watermark", "0.4") end)
    assert(H.ctl("set_vm_memory_high_watermark", "0.0001"))
    local proc = H.worker(script, q, { "--prefetch", 2, "--drain-timeout", 1 },
      { [H.RECORD_ENV] = rec })
    proc:wait_log("the broker blocked publishing", 15)
    H.wait_until(function() return ticks(rec) == 30 end, 15, "30 ticks")
    local _, gap = ticks(rec)
    assert.is_true(gap < 0.5, "largest gap between ticks: " .. gap .. " s")
    -- The ticking job's ack reached the broker; the publishing job still waits.
    H.wait_until(function() return unacked(q) == 1 end, 10, "the tick's ack at the broker")
    assert.is_nil(has_record(rec, "published"))
    local t0 = H.now()
    proc:signal("TERM")
    assert.equal(75, proc:wait(10))
    assert.is_true(H.now() - t0 < 3, "exit took " .. (H.now() - t0) .. " s")
    H.ctl("set_vm_memory_high_watermark", "0.4")
    -- The publishing job's message is handed back; the big message never went out.
    H.wait_until(function() return H.depth(q) == 1 end, 15, "the message back in the queue")
    assert.same({ "pub1" }, H.ids(H.drain(q)))
    assert.equal(0, (H.depth(out)))
  end)

  it("keeps its loop going when the path is black-holed during a large publish", function()
    local q = H.queue("hole")
    local out = H.queue("hole-out")
    local rec = H.record_file()
    local proxy = H.proxy(H.url)
    finally(function() proxy:stop() end)
    H.publish(q, 1, { prefix = "pub", body = "pub" })
    H.publish(q, 1, { prefix = "tick", body = "tick" })
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      local BIG = string.rep("x", 32 * 1024 * 1024)
    ]] .. TICKER .. [[
      function handle(body, msg)
        if body == "pub" then
          -- A first publish opens the publishing connection through the proxy.
          assert(warren.publish{ routing_key = "]] .. out .. [[", body = "small" })
          record("ready")
          warren.sleep(0.5)
          record("big")
          local ok, err = warren.publish{ routing_key = "]] .. out .. [[", body = BIG }
          record("published", tostring(ok), tostring(err))
        else
          tick(100)
        end
      end]])
    local proc = H.worker(script, q, { "--prefetch", 2, "--heartbeat", 1 },
      { [H.RECORD_ENV] = rec }, proxy.url)
    H.wait_until(function() return has_record(rec, "ready") end, 10, "the first publish")
    proxy:hold()
    local held = H.now()
    H.wait_until(function() return has_record(rec, "big") end, 5, "the big publish")
    proc:wait_log("connection lost", 10)
    local detected = H.now() - held
    assert.is_true(detected < 3.5 * 3, "loss detected after " .. detected .. " s")
    local n, gap = ticks(rec)
    assert.is_true(n >= 10, "only " .. n .. " ticks before the loss")
    assert.is_true(gap < 0.5, "largest gap between ticks: " .. gap .. " s")
    local t0 = H.now()
    proc:signal("TERM")
    assert.equal(0, proc:wait(5)) -- reconnecting: nothing in flight
    assert.is_true(H.now() - t0 < 1, "exit took " .. (H.now() - t0) .. " s")
    -- Once the path is gone for good, the broker hands both messages back.
    proxy:stop()
    H.wait_until(function() return H.depth(q) == 2 end, 30, "both messages back")
    assert.same({ "pub1", "tick1" }, H.ids(H.drain(q)))
  end)

  it("gives up on a silent host within --connect-timeout, and obeys a signal at once", function()
    local proxy = H.proxy(H.url)
    finally(function() proxy:stop() end)
    proxy:hold() -- TCP connects, and no byte ever comes back
    local script = H.script("function handle() end")
    local t0 = H.now()
    local code, log = H.run({ "--url", proxy.url, "-q", "none", "--connect-timeout", 0.5, script })
    local took = H.now() - t0
    assert.equal(69, code, log)
    assert.is_true(took < 1.5, "took " .. took .. " s")
    assert.matches("no connection within", log, 1, true)

    local proc = H.start(script, { "--url", proxy.url, "-q", "none", "--connect-timeout", 30,
      "--log-level", "debug" })
    proc:wait_log("connecting to URL", 10)
    t0 = H.now()
    proc:signal("TERM")
    assert.equal(0, proc:wait(5))
    took = H.now() - t0
    assert.is_true(took < 0.3 * 3, "exit took " .. took .. " s")
  end)

  it("handles messages at once after the queue is re-declared, with heartbeats off", function()
    local q = H.queue("redeclare")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg) record("ran", msg.message_id, now()) end]])
    local proc = H.worker(script, q, { "--heartbeat", 0 }, { [H.RECORD_ENV] = rec })
    H.delete_queue(q)
    proc:wait_log("cancelled the consumer", 10)
    -- The messages wait before warren consumes again: the consume's reply
    -- and the first deliveries come together.
    H.wtool({ "declare", q })
    H.publish(q, 3, { prefix = "back" })
    H.wait_until(function()
      local _, consumers = H.depth(q)
      return consumers == 1
    end, 15, "warren consuming again")
    local t0 = H.now()
    H.wait_until(function() return #H.records(rec) == 3 end, 5, "three messages handled")
    for _, r in ipairs(H.records(rec)) do
      local late = tonumber(r[3]) - t0
      assert.is_true(late < 1, "handled " .. late .. " s after the re-consume")
    end
    assert.equal(0, H.term(proc))
    assert.equal(0, (H.depth(q)))
  end)

  it("tries a host name's addresses one by one", function()
    -- A hosts file of its own (nss_wrapper) gives the name two addresses: nothing listens
    -- on the first, the broker on the second.
    local hosts = H.tmpdir() .. "/hosts"
    H.write_file(hosts, "127.0.0.2 two-addresses.test\n127.0.0.1 two-addresses.test\n")
    local q = H.queue("addresses")
    local rec = H.record_file()
    local port = assert(H.url:match(":(%d+)/?$"))
    local proc = H.spawn({ H.warren_bin, "--url", "amqp://guest:guest@two-addresses.test:" .. port,
      "-q", q, "--log-level", "debug", H.script(H.RECORD_LUA .. [[
        function handle(body, msg) record("done", msg.message_id) end]]) },
      { env = { LD_PRELOAD = "libnss_wrapper.so", NSS_WRAPPER_HOSTS = hosts,
        NSS_WRAPPER_PASSWD = "/etc/passwd", NSS_WRAPPER_GROUP = "/etc/group",
        -- A sanitizer build wants its runtime first; the preload comes after it, harmlessly.
        ASAN_OPTIONS = (os.getenv("ASAN_OPTIONS") or "") .. ":verify_asan_link_order=0",
        [H.RECORD_ENV] = rec }, unset = H.WARREN_OPTION_VARS })
    proc:wait_log("two%-addresses%.test %(127%.0%.0%.2 port " .. port .. "%): .*trying its next address", 10)
    proc:wait_log("consuming '", 10)
    local ids = H.publish(q, 2)
    H.wait_until(function() return #H.records(rec) == 2 end, 10, "both handled")
    assert.same(ids, H.ids(H.records(rec)))
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
  end)

  it("exits 75, never 0, when a frozen broker cannot confirm the close", function()
    local q = H.queue("frozen")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg) record("start"); warren.sleep(1) end]])
    local proc = H.worker(script, q, { "--heartbeat", 0 }, { [H.RECORD_ENV] = rec })
    H.publish(q, 1, { prefix = "f" })
    H.wait_until(function() return has_record(rec, "start") end, 10, "the job")
    local pid = assert(tonumber(H.read_file(H.broker_dir .. "/rabbit.pid")), "broker pid")
    finally(function() os.execute("kill -CONT " .. pid) end)
    assert(os.execute("kill -STOP " .. pid))
    proc:signal("TERM")
    local code = proc:wait(10)
    os.execute("kill -CONT " .. pid)
    assert.equal(75, code, proc:log())
    assert.matches("did not confirm the close", proc:log(), 1, true)
  end)
end)
