-- Graceful drain and forced exit, with real signals and message ids.
local H = require "support.helper"

-- A job that records when it starts and ends, sleeps as long as its body
-- says, and records when its <close> variable runs.
local sleeper = H.RECORD_LUA .. [[
  local warren = require "warren"
  function handle(body, msg)
    local guard <close> = setmetatable({}, { __close = function() record("closed", msg.message_id) end })
    record("start", msg.message_id, now())
    warren.sleep(tonumber(body))
    record("end", msg.message_id, now(), tostring(warren.draining()))
  end]]

local function count(records, kind)
  local n = 0
  for _, r in ipairs(records) do if r[1] == kind then n = n + 1 end end
  return n
end

local function started(rec, n)
  H.wait_until(function() return count(H.records(rec), "start") >= n end, 10, n .. " jobs started")
end

describe("drain", function()
  after_each(H.stop_all)

  it("exits 0 at once on SIGTERM with nothing in flight, leaving the queue as it was", function()
    local q = H.queue("idle")
    local proc = H.worker(H.script(sleeper), q)
    local t0 = H.now()
    proc:signal("TERM")
    assert.equal(0, proc:wait(5))
    assert.is_true(H.now() - t0 < 1, "took " .. (H.now() - t0) .. " s")
    assert.matches("nothing in flight", proc:log(), 1, true)
    local ready, consumers = H.depth(q)
    assert.equal(0, ready)
    assert.equal(0, consumers)
  end)

  it("lets a 1 s job finish and exits 0 right after it, well before the timeout", function()
    local q = H.queue("finish")
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "one", body = "1" })
    local proc = H.worker(H.script(sleeper), q, { "--drain-timeout", "5" }, { [H.RECORD_ENV] = rec })
    started(rec, 1)
    proc:signal("TERM")
    local t0 = H.now()
    assert.equal(0, proc:wait(10))
    local took = H.now() - t0
    assert.is_true(took < 1.5, "exit took " .. took .. " s")
    local log = proc:log()
    assert.matches("draining 1 job in flight, up to 5 s; a second signal forces exit", log, 1, true)
    local recs = H.records(rec)
    assert.equal(1, count(recs, "end"))
    for _, r in ipairs(recs) do
      if r[1] == "end" then assert.equal("true", r[4]) end -- warren.draining() turned true
    end
    assert.equal(0, (H.depth(q)))
    assert.same({}, H.drain(q))
  end)

  it("forces exit 75 after the drain timeout, handing the message back and running <close>", function()
    local q = H.queue("timeout")
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "long", body = "10" })
    local proc = H.worker(H.script(sleeper), q, { "--drain-timeout", "1" }, { [H.RECORD_ENV] = rec })
    started(rec, 1)
    local t0 = H.now()
    proc:signal("TERM")
    assert.equal(75, proc:wait(10))
    local took = H.now() - t0
    -- The 1 s drain timeout, then up to a second (times H.slow) to hand back and exit.
    assert.is_true(took > 0.9 and took < 1 + H.slow, "exit took " .. took .. " s")
    local recs = H.records(rec)
    assert.equal(0, count(recs, "end"))
    assert.equal(1, count(recs, "closed"))
    assert.matches("drain timeout of 1 s reached", proc:log(), 1, true)
    assert.matches("handed back 1 message;", proc:log(), 1, true)
    local back = H.drain(q)
    assert.equal(1, #back)
    assert.equal("long1", back[1].id)
    assert.is_true(back[1].redelivered)
  end)

  it("forces exit 75 at once on a second SIGINT", function()
    local q = H.queue("twice")
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "int", body = "10" })
    local proc = H.worker(H.script(sleeper), q, { "--drain-timeout", "30" }, { [H.RECORD_ENV] = rec })
    started(rec, 1)
    proc:signal("INT")
    proc:wait_log("second signal forces exit", 5)
    local t0 = H.now()
    proc:signal("INT")
    assert.equal(75, proc:wait(5))
    assert.is_true(H.now() - t0 < 1, "exit took " .. (H.now() - t0) .. " s")
    assert.equal(1, count(H.records(rec), "closed"))
    local back = H.drain(q)
    assert.equal(1, #back)
    assert.equal("int1", back[1].id)
  end)

  it("completes the jobs in flight and hands back the rest: acked + ready = published", function()
    local q = H.queue("many")
    local rec = H.record_file()
    local ids = H.publish(q, 30, { prefix = "w", body = "1" })
    local proc = H.worker(H.script(sleeper), q, { "--prefetch", "10", "--drain-timeout", "5" },
      { [H.RECORD_ENV] = rec })
    started(rec, 10)
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    local recs = H.records(rec)
    local ended = {}
    for _, r in ipairs(recs) do if r[1] == "end" then ended[r[2]] = true end end
    assert.equal(count(recs, "start"), count(recs, "end"))
    local left = H.drain(q)
    local total = count(recs, "end")
    for _, m in ipairs(left) do
      assert.is_nil(ended[m.id], m.id .. " was handled and is still in the queue")
      total = total + 1
    end
    assert.equal(#ids, total)
    assert.is_true(count(recs, "end") >= 10)
  end)

  it("interrupts a CPU-bound job in the forced stage and exits 75 within a second", function()
    local q = H.queue("spin")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg)
        local guard <close> = setmetatable({}, { __close = function() record("closed", msg.message_id) end })
        record("start", msg.message_id, now())
        while true do end
      end]])
    H.publish(q, 1, { prefix = "cpu" })
    local proc = H.worker(script, q, { "--drain-timeout", "0.5" }, { [H.RECORD_ENV] = rec })
    started(rec, 1)
    local t0 = H.now()
    proc:signal("TERM")
    assert.equal(75, proc:wait(5))
    assert.is_true(H.now() - t0 < 1.5, "exit took " .. (H.now() - t0) .. " s")
    assert.equal(1, count(H.records(rec), "closed"))
    local back = H.drain(q)
    assert.equal(1, #back)
    assert.equal("cpu1", back[1].id)
  end)

  it("keeps serving timers while a job spins, and lets the spinning job run on", function()
    local q = H.queue("fair")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        record("start", msg.message_id, now())
        if body == "spin" then
          local t = now()
          while now() - t < 1.5 do end
        else
          warren.sleep(0.2)
        end
        record("end", msg.message_id, now())
      end]])
    H.publish(q, 1, { prefix = "spin", body = "spin" })
    H.publish(q, 1, { prefix = "nap", body = "nap" })
    local proc = H.worker(script, q, { "--prefetch", "2" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return count(H.records(rec), "end") == 2 end, 10, "both jobs")
    local t = {}
    for _, r in ipairs(H.records(rec)) do t[r[1] .. r[2]] = tonumber(r[3]) end
    -- The sleeper ends while the spinner still spins: the loop got turns.
    assert.is_true(t.endnap1 < t.endspin1, "the sleeping job waited for the spinning one")
    assert.is_true(t.endnap1 - t.startnap1 < 0.6, "sleep of 0.2 s took " .. (t.endnap1 - t.startnap1))
    proc:signal("TERM")
    assert.equal(0, proc:wait(5))
    assert.equal(0, (H.depth(q)))
  end)

  it("keeps heartbeats flowing through a drain longer than twice the heartbeat", function()
    local q = H.queue("beat")
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "hb", body = "4" })
    local proc = H.worker(H.script(sleeper), q,
      { "--heartbeat", "1", "--drain-timeout", "10" }, { [H.RECORD_ENV] = rec })
    started(rec, 1)
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    assert.equal(1, count(H.records(rec), "end"))
    local log = proc:log()
    assert.is_nil(log:find("connection lost", 1, true), log)
    assert.is_nil(log:find("heartbeat", 1, true), log)
    assert.equal(0, (H.depth(q)))
    assert.same({}, H.drain(q))
  end)
end)
