-- The quiet stage: SIGUSR1 stops taking work but stays connected, jobs in
-- flight finish, and SIGUSR2 consumes again; checked by message id.
local H = require "support.helper"

describe("quiet stage", function()
  after_each(H.stop_all)

  it("finishes jobs in flight, takes nothing new while connected, and resumes on SIGUSR2",
    function()
    local q = H.queue("quiet")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        record("start", msg.message_id)
        warren.sleep(tonumber(body))
        record("end", msg.message_id)
      end]])
    local ids = H.publish(q, 10, { prefix = "q", body = "0.5" })
    local proc = H.worker(script, q, { "--prefetch", 4 }, { [H.RECORD_ENV] = rec })
    local function count(kind)
      local n = 0
      for _, r in ipairs(H.records(rec)) do if r[1] == kind then n = n + 1 end end
      return n
    end
    H.wait_until(function() return count("start") >= 4 end, 10, "four jobs")
    proc:signal("USR1")
    proc:wait_log("quiet: all jobs finished", 10)
    local started = count("start")
    assert.equal(started, count("end"))
    assert.is_true(started < 10, started .. " jobs ran")
    -- Idle and connected: the rest wait in the queue with no consumer.
    H.wait_until(function()
      local ready, consumers = H.depth(q)
      return ready == 10 - started and consumers == 0
    end, 5, "the rest back in the queue, no consumer")
    H.sleep(1) -- a quiet period: nothing more may start
    assert.equal(started, count("start"))
    assert.is_nil(proc:log():find("connection lost", 1, true))
    proc:signal("USR2")
    H.wait_until(function() return count("end") == 10 end, 15, "the rest after SIGUSR2")
    assert.equal(0, H.term(proc))
    -- Each message once, and none redelivered by the pause.
    local seen = {}
    for _, r in ipairs(H.records(rec)) do
      if r[1] == "end" then
        assert.is_nil(seen[r[2]], r[2] .. " ran twice")
        seen[r[2]] = true
      end
    end
    for _, id in ipairs(ids) do assert.is_true(seen[id], id .. " never ran") end
    assert.same({}, H.drain(q))
  end)

  it("drains from the quiet stage on SIGTERM, and ignores SIGUSR2 when not quiet", function()
    local q = H.queue("quiet-term")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg) record("end", msg.message_id) end]])
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    proc:signal("USR2")
    H.publish(q, 1, { prefix = "a" })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "a job")
    proc:signal("USR1")
    proc:wait_log("quiet: all jobs finished", 10)
    H.publish(q, 2, { prefix = "b" })
    assert.equal(0, H.term(proc))
    assert.equal(1, #H.records(rec))
    assert.same({ "b1", "b2" }, H.ids(H.drain(q)))
  end)
end)
