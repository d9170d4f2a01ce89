-- Quorum queues, against a real broker: the broker's count of deliveries reaches
-- msg.delivery_count, x-delivery-limit ends a poison message's requeue loop in the dead-letter
-- queue, a retry copy is a new message to that limit while a hand-back counts, and a single
-- active consumer hands over to the next worker when it drains.
local H = require "support.helper"

-- Each run records: "run", id, delivery_count ("-" when unset), retries, redelivered, time,
-- WORKER, draining; a job that ends normally records "done", id, WORKER.
--   body "requeue N": requeued until the broker has delivered it N times before
--   body "fail":      raises an error
--   body "flaky":     requeued when not redelivered, else raises an error
--   body SECONDS:     sleeps that long
local script = H.script(H.RECORD_LUA .. [[
  local warren = require "warren"
  function handle(body, msg)
    local worker = os.getenv("WORKER") or "-"
    record("run", msg.message_id, msg.delivery_count or "-", msg.retries,
      tostring(msg.redelivered), now(), worker, tostring(warren.draining()))
    local limit = body:match("^requeue (%d+)$")
    if limit and (msg.delivery_count or 0) < tonumber(limit) then return warren.requeue() end
    if body == "fail" then error("poison " .. msg.message_id) end
    if body == "flaky" then
      if not msg.redelivered then return warren.requeue() end
      error("flaky " .. msg.message_id)
    end
    warren.sleep(tonumber(body) or 0)
    record("done", msg.message_id, worker)
  end]])

-- The records of kind for id, in order.
local function of(rec, kind, id)
  local out = {}
  for _, r in ipairs(H.records(rec)) do
    if r[1] == kind and r[2] == id then out[#out + 1] = r end
  end
  return out
end

-- Field i of each record: column(runs, 3) lists the delivery counts.
local function column(records, i)
  local out = {}
  for n, r in ipairs(records) do out[n] = r[i] end
  return out
end

-- The ids of every "done" record in the record files given.
local function done_ids(...)
  local out = {}
  for _, rec in ipairs({ ... }) do
    for _, r in ipairs(H.records(rec)) do
      if r[1] == "done" then out[#out + 1] = r[2] end
    end
  end
  return out
end

-- Occurrences of a plain string in text.
local function occurrences(text, s)
  local n, at = 0, 1
  while true do
    local i = text:find(s, at, true)
    if not i then return n end
    n, at = n + 1, i + #s
  end
end

describe("a quorum queue", function()
  after_each(H.stop_all)

  it("gives msg.delivery_count the broker's count: unset at first, then 1 and 2", function()
    local q = H.queue("qcount", { quorum = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "twice", body = "requeue 2" })
    H.publish(q, 1, { prefix = "plain", body = "0" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #of(rec, "done", "twice1") == 1 end, 10, "twice1 acked")
    H.wait_until(function() return #of(rec, "done", "plain1") == 1 end, 10, "plain1 acked")
    local runs = of(rec, "run", "twice1")
    assert.same({ "-", "1", "2" }, column(runs, 3))
    assert.same({ "false", "true", "true" }, column(runs, 5))
    assert.same({ "-" }, column(of(rec, "run", "plain1"), 3))
    assert.equal(0, H.term(proc))
    assert.same({}, H.drain(q))
  end)

  it("dead-letters a poison message after x-delivery-limit + 1 deliveries with --on-error "
    .. "requeue; good messages are acked once", function()
    local q, dlq = H.queue("qlimit", { quorum = true, delivery_limit = 2, dead_letter = true })
    local rec = H.record_file()
    local good = H.publish(q, 3, { prefix = "good", body = "0" })
    H.publish(q, 1, { prefix = "bad", body = "fail" })
    local more = H.publish(q, 3, { prefix = "late", body = "0" })
    local proc = H.worker(script, q, { "--on-error", "requeue" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "bad1 dead-lettered")
    for _, id in ipairs({ good[1], good[2], good[3], more[1], more[2], more[3] }) do
      H.wait_until(function() return #of(rec, "done", id) == 1 end, 10, id .. " acked")
      assert.equal(1, #of(rec, "run", id), id)
    end
    local runs = of(rec, "run", "bad1")
    assert.same({ "-", "1", "2" }, column(runs, 3))
    assert.equal(0, #of(rec, "done", "bad1"))
    assert.equal(3, occurrences(proc:log(), "failed: requeue at once (--on-error requeue)"))
    assert.equal(0, H.term(proc))
    local dead = H.drain(dlq)
    assert.same({ "bad1" }, H.ids(dead))
    assert.equal(1, dead[1].deaths)
    assert.same({}, H.drain(q))
  end)

  it("counts a retry copy's deliveries anew, and --max-retries ends the retries", function()
    local q, dlq = H.queue("qretry", { quorum = true, delivery_limit = 1, dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "flaky", body = "flaky" })
    local proc = H.worker(script, q, { "--max-retries", "1" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "flaky1 dead-lettered")
    -- Each message is requeued once (within the limit of 1), then fails: the original is
    -- retried, the copy rejected. Were the copy's deliveries added to the original's, the
    -- broker would have dead-lettered it at its requeue, before its second run.
    local runs = of(rec, "run", "flaky1")
    assert.same({ "0", "0", "1", "1" }, column(runs, 4))
    assert.same({ "false", "true", "false", "true" }, column(runs, 5))
    -- The copy is a new message: its first delivery has no count, whatever the original's.
    assert.same({ "-", "1", "-", "1" }, column(runs, 3))
    local log = proc:log()
    assert.matches("job flaky1 (tag 2) failed: retry in 1 s as attempt 1 of 1", log, 1, true)
    assert.matches("job flaky1 (tag 4) failed: reject, 1 of 1 retries used", log, 1, true)
    assert.equal(0, H.term(proc))
    assert.same({ "flaky1" }, H.ids(H.drain(dlq)))
    assert.same({}, H.drain(q))
    H.delete_queue(q .. ".retry.1000")
  end)

  it("counts an interrupted job's hand-back as a delivery toward x-delivery-limit", function()
    local q, dlq = H.queue("qforced", { quorum = true, delivery_limit = 0, dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "long", body = "30" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #of(rec, "run", "long1") == 1 end, 10, "long1 started")
    proc:signal("TERM")
    proc:wait_log("a second signal forces exit")
    proc:signal("TERM")
    assert.equal(75, proc:wait(10))
    assert.matches("handed back 1 message", proc:log(), 1, true)
    -- Handed back once, past a limit of 0: the broker dead-letters it instead of redelivering.
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "long1 dead-lettered")
    assert.same({ "long1" }, H.ids(H.drain(dlq)))
    assert.same({}, H.drain(q))
    assert.equal(0, #of(rec, "done", "long1"))
  end)

  it("exits 69 at once when --declare meets it, naming the queue", function()
    local q = H.queue("qdeclare", { quorum = true })
    local t0 = H.now()
    local code, out = H.run({ "--url", H.url, "-q", q, "--declare", script }, { timeout = 20 })
    assert.equal(69, code, out)
    assert.is_true(H.now() - t0 < 5, "took " .. (H.now() - t0) .. " s")
    assert.matches("queue '" .. q:gsub("%-", "%%-") .. "' exists with other arguments than "
      .. "%-%-declare gives %(PRECONDITION_FAILED .*x%-queue%-type", out)
  end)

  it("with a single active consumer, runs on one worker, and hands over without loss when it "
    .. "drains", function()
    local q = H.queue("qsac", { quorum = true, single_active = true })
    local rec_a, rec_b = H.record_file(), H.record_file()
    local args = { "--prefetch", "2", "--drain-timeout", "10" }
    local a = H.worker(script, q, args, { [H.RECORD_ENV] = rec_a, WORKER = "a" })
    local b = H.start(script, { "--url", H.url, "--queue", q, table.unpack(args) },
      { env = { [H.RECORD_ENV] = rec_b, WORKER = "b" } })
    -- The broker counts only the active consumer; b's log says it consumes, waiting.
    b:wait_log("consuming '" .. q:gsub("%-", "%%-") .. "'")
    local ids = H.publish(q, 20, { prefix = "s", body = "0.05" })
    H.wait_until(function() return #H.records(rec_a) >= 10 end, 10, "a at work")
    local signalled = H.now()
    a:signal("TERM")
    local later = H.publish(q, 20, { prefix = "t", body = "0.05" })
    assert.equal(0, a:wait(10), a:log())
    for _, id in ipairs(later) do ids[#ids + 1] = id end
    H.wait_until(function() return #done_ids(rec_a, rec_b) >= #ids end, 20, "every id acked")
    -- Only a worked until it was signalled: b ran nothing before, a started nothing after.
    for _, r in ipairs(H.records(rec_a)) do
      if r[1] == "run" then assert.equal("false", r[8], r.line) end
    end
    for _, r in ipairs(H.records(rec_b)) do
      if r[1] == "run" then assert.is_true(tonumber(r[6]) > signalled, r.line) end
    end
    -- Every id acked exactly once, by one worker or the other.
    assert.same(H.sorted(ids), H.sorted(done_ids(rec_a, rec_b)))
    assert.is_true(#done_ids(rec_b) >= 10, "b did not take over")
    assert.equal(0, H.term(b))
    -- basic.get is refused on a queue with a single active consumer: its depth says it all.
    assert.equal(0, (H.depth(q)))
  end)
end)
