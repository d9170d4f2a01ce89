-- The failure policy and the job limits, against a real broker: a failed job's message is
-- retried through a delay queue with backoff (x-warren-retries), requeued or rejected as
-- --on-error says; --job-timeout and --memory-limit make a job fail alone.
local H = require "support.helper"

-- Each delivery records: "run", id, retries, redelivered, time; a closer records "closed", id.
local script = H.script(H.RECORD_LUA .. [[
  local warren = require "warren"
  function handle(body, msg)
    local guard <close> = setmetatable({}, {
      __close = function() record("closed", msg.message_id) end })
    record("run", msg.message_id, msg.retries, tostring(msg.redelivered), now())
    if body == "fail" then error("boom in " .. msg.message_id) end
    if body == "sleep" then warren.sleep(30) end
    if body == "spin" then while true do end end
    if body == "hog" then
      local t = {}
      for i = 1, 1e9 do t[i] = ("x"):rep(100) .. i end
    end
    if body == "flaky" then -- handed back once (a redelivery), then fails once
      if not msg.redelivered and msg.retries == 0 then return warren.requeue() end
      if msg.retries == 0 then error("first failure of " .. msg.message_id) end
    end
    if body == "nap" then warren.sleep(0.5) end
  end]])

-- The "run" records of id: {retries, redelivered, time}.
local function runs(rec, id)
  local out = {}
  for _, r in ipairs(H.records(rec)) do
    if r[1] == "run" and r[2] == id then out[#out + 1] = { r[3], r[4], tonumber(r[5]) } end
  end
  return out
end

local function count(rec, kind, id)
  local n = 0
  for _, r in ipairs(H.records(rec)) do
    if r[1] == kind and r[2] == id then n = n + 1 end
  end
  return n
end

-- Deletes the delay queue of delay ms of q once it is empty.
local function delete_delay_queue(q, ms)
  local name = q .. ".retry." .. ms
  H.wait_until(function() return H.depth(name) == 0 end, 10, name .. " empty")
  H.delete_queue(name)
end

describe("the failure policy", function()
  after_each(H.stop_all)

  it("retries a failing message after 1 s with its count raised, then dead-letters it", function()
    local q, dlq = H.queue("fails", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "bad", body = "fail" })
    H.publish(q, 1, { prefix = "good", body = "ok" })
    local proc = H.worker(script, q, { "--max-retries", "1" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "dead-lettered")
    local r = runs(rec, "bad1")
    assert.equal(2, #r)
    assert.same({ "0", "false" }, { r[1][1], r[1][2] })
    assert.same({ "1", "false" }, { r[2][1], r[2][2] })
    local gap = r[2][3] - r[1][3]
    assert.is_true(gap >= 0.95 and gap < 4, "retried after " .. gap .. " s")
    assert.equal(2, count(rec, "closed", "bad1"))
    assert.equal(1, #runs(rec, "good1"))
    local log = proc:log()
    assert.matches("boom in bad1", log, 1, true)
    assert.matches("stack traceback", log, 1, true)
    assert.matches("job bad1 (tag 1) failed: retry in 1 s as attempt 1 of 1", log, 1, true)
    assert.matches("job bad1 (tag 3) failed: reject, 1 of 1 retries used", log, 1, true)
    assert.equal(0, H.term(proc))
    assert.same({ "bad1" }, H.ids(H.drain(dlq)))
    assert.same({}, H.drain(q))
    delete_delay_queue(q, 1000)
  end)

  it("retries a redelivered message's first error instead of rejecting it", function()
    local q, dlq = H.queue("redelivered", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "r", body = "flaky" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #runs(rec, "r1") == 3 and H.depth(q) == 0 end, 10,
      "the retried delivery")
    local r = runs(rec, "r1")
    assert.same({ { "0", "false" }, { "0", "true" }, { "1", "false" } },
      { { r[1][1], r[1][2] }, { r[2][1], r[2][2] }, { r[3][1], r[3][2] } })
    assert.matches("job r1 (tag 2) failed: retry in 1 s as attempt 1 of 5", proc:log(), 1, true)
    assert.equal(0, H.term(proc))
    assert.same({}, H.drain(dlq))
    delete_delay_queue(q, 1000)
  end)

  it("requeues at once with --on-error requeue", function()
    local q, dlq = H.queue("requeues", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "q", body = "fail" })
    local proc = H.worker(script, q, { "--on-error", "requeue" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #runs(rec, "q1") >= 3 end, 10, "three deliveries")
    local r = runs(rec, "q1")
    assert.same({ "0", "false" }, { r[1][1], r[1][2] })
    assert.same({ "0", "true" }, { r[2][1], r[2][2] })
    assert.is_true(r[3][3] - r[1][3] < 1, "not requeued at once")
    assert.matches("job q1 (tag 1) failed: requeue at once (--on-error requeue)", proc:log(), 1,
      true)
    proc:stop()
    assert.same({}, H.drain(dlq))
    assert.same({ "q1" }, H.ids(H.drain(q)))
  end)

  it("dead-letters at once with --on-error reject", function()
    local q, dlq = H.queue("rejects", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "x", body = "fail" })
    local proc = H.worker(script, q, { "--on-error", "reject" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "dead-lettered")
    assert.equal(1, #runs(rec, "x1"))
    assert.matches("job x1 (tag 1) failed: reject (--on-error reject)", proc:log(), 1, true)
    assert.equal(0, H.term(proc))
    assert.same({ "x1" }, H.ids(H.drain(dlq)))
  end)
end)

describe("job limits", function()
  after_each(H.stop_all)

  it("fails a sleeping and a spinning job past --job-timeout, runs their closers, and retries",
    function()
    local q, dlq = H.queue("timeouts", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "sleep", body = "sleep" })
    H.publish(q, 1, { prefix = "spin", body = "spin" })
    H.publish(q, 1, { prefix = "ok", body = "nap" })
    local proc = H.worker(script, q, { "-p", "3", "--job-timeout", "1", "--max-retries", "1" },
      { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 2 end, 15, "both dead-lettered")
    for _, id in ipairs({ "sleep1", "spin1" }) do
      local r = runs(rec, id)
      assert.equal(2, #r, id)
      assert.same({ "0", "1" }, { r[1][1], r[2][1] })
      assert.is_true(r[2][3] - r[1][3] >= 1.9, id .. " retried too soon")
      assert.equal(2, count(rec, "closed", id))
      assert.matches("job " .. id .. " %(tag %d+%) timed out: ran longer than 1 s %(%-%-job%-timeout%)",
        proc:log())
      assert.matches("job " .. id .. " %(tag %d+%) timed out: retry in 1 s as attempt 1 of 1",
        proc:log())
    end
    assert.equal(1, #runs(rec, "ok1"))
    assert.equal(1, count(rec, "closed", "ok1"))
    assert.equal(0, H.term(proc))
    assert.same({ "sleep1", "spin1" }, H.ids(H.drain(dlq)))
    assert.same({}, H.drain(q))
    delete_delay_queue(q, 1000)
  end)

  it("fails the job that allocates past --memory-limit alone; the others ack", function()
    local q, dlq = H.queue("memory", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 2, { prefix = "nap", body = "nap" })
    H.publish(q, 1, { prefix = "hog", body = "hog" })
    local proc = H.worker(script, q,
      { "-p", "3", "--memory-limit", "32", "--on-error", "reject" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "the hog dead-lettered")
    proc:wait_log("job hog1 %(tag 3%) failed: not enough memory")
    proc:wait_log("job hog1 %(tag 3%) ran out of memory: reject %(%-%-on%-error reject%)")
    assert.equal(1, count(rec, "closed", "hog1"))
    -- The version serves on: the state's memory is back for the next message.
    H.publish(q, 1, { prefix = "after", body = "ok" })
    H.wait_until(function() return #runs(rec, "after1") == 1 and H.depth(q) == 0 end, 10,
      "the next message")
    H.wait_until(function() return count(rec, "closed", "nap2") == 1 end, 10, "the naps")
    assert.equal(0, H.term(proc))
    assert.same({ "hog1" }, H.ids(H.drain(dlq)))
    assert.same({}, H.drain(q))
    assert.equal(1, count(rec, "closed", "nap1"))
  end)

  it("names the copy of a message without an id, and the log goes on by that id", function()
    local q = H.queue("noid")
    local script = H.script('function handle(body, msg) error("boom") end')
    local proc = H.worker(script, q, { "--max-retries", 1 })
    assert.is_true(os.execute("amqp-publish --url=" .. H.quote(H.url) .. " -p -r " .. H.quote(q)
      .. " -b x"))
    local pattern = "job %(tag %d+%) failed: retry in 1 s as attempt 1 of 1; the copy is message "
      .. "(warren%-%d+%-r%d+)"
    proc:wait_log(pattern, 10)
    local id = proc:log():match(pattern)
    proc:wait_log("job " .. id:gsub("%-", "%%-") .. " %(tag %d+%) failed: reject, 1 of 1 retries "
      .. "used", 10)
    assert.equal(0, H.term(proc))
  end)
end)
