-- Publishing with confirms, replies and delayed retries, against a real broker.
local H = require "support.helper"

-- Publishes to the exchange named by the body, recording the result.
local TO_EXCHANGE_IN_BODY = H.RECORD_LUA .. [[
  local warren = require "warren"
  function handle(body, msg)
    local ok, err = warren.publish{ exchange = body, routing_key = os.getenv("TARGET"),
                                    body = "b", message_id = "out-" .. msg.message_id }
    record(msg.message_id, tostring(ok), (tostring(err):gsub(" ", "_")))
  end]]

describe("publish", function()
  after_each(H.stop_all)

  it("waits for the broker's confirm, and the message is in the target queue", function()
    local q = H.queue("pub")
    local target = H.queue("pub-target")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local ok, err = warren.publish{ routing_key = os.getenv("TARGET"), body = "done " .. body,
                                        message_id = "out-" .. msg.message_id,
                                        headers = { step = 2, tags = { "a", "b" } } }
        record(msg.message_id, tostring(ok), tostring(err))
      end]])
    H.publish(q, 3, { prefix = "in", body = "x" })
    local proc = H.worker(script, q, { "-p", "3" }, { [H.RECORD_ENV] = rec, TARGET = target })
    H.wait_until(function() return #H.records(rec) == 3 end, 10, "3 jobs")
    for _, r in ipairs(H.records(rec)) do assert.same({ "true", "nil" }, { r[2], r[3] }) end
    assert.equal(0, H.term(proc))
    assert.same({ "out-in1", "out-in2", "out-in3" }, H.ids(H.drain(target)))
    assert.equal(0, (H.depth(q)))
  end)

  it("returns an error the job can handle for a missing exchange, then publishes again", function()
    local q = H.queue("badex")
    local target = H.queue("badex-target")
    local rec = H.record_file()
    local script = H.script(TO_EXCHANGE_IN_BODY)
    H.publish(q, 1, { prefix = "missing", body = "no-such-exchange" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec, TARGET = target })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "first job")
    H.publish(q, 1, { prefix = "fine", body = "" })
    H.wait_until(function() return #H.records(rec) == 2 end, 10, "second job")
    local recs = H.records(rec)
    assert.equal("nil", recs[1][2])
    assert.matches("NOT_FOUND", recs[1][3])
    assert.same({ "fine1", "true" }, { recs[2][1], recs[2][2] })
    assert.equal(0, H.term(proc))
    assert.same({ "out-fine1" }, H.ids(H.drain(target)))
    assert.equal(0, (H.depth(q)))
  end)

  it("reports a message no queue takes as returned", function()
    local q = H.queue("unroutable")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local ok, err = warren.publish{ routing_key = "no-queue-by-this-name", body = "b" }
        record(msg.message_id, tostring(ok), (tostring(err):gsub(" ", "_")))
      end]])
    H.publish(q, 1, { prefix = "u" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "job")
    local r = H.records(rec)[1]
    assert.equal("nil", r[2])
    assert.matches("NO_ROUTE", r[3])
    assert.equal(0, H.term(proc))
  end)

  it("fails only the publish that names a missing exchange, not another job's in flight", function()
    local q = H.queue("isolate")
    local target = H.queue("isolate-target")
    local rec = H.record_file()
    local script = H.script(TO_EXCHANGE_IN_BODY)
    H.publish(q, 1, { prefix = "missing", body = "no-such-exchange" })
    H.publish(q, 1, { prefix = "fine", body = "" })
    local proc = H.worker(script, q, { "-p", "2" }, { [H.RECORD_ENV] = rec, TARGET = target })
    H.wait_until(function() return #H.records(rec) == 2 end, 10, "both jobs")
    local results = {}
    for _, r in ipairs(H.records(rec)) do results[r[1]] = r end
    assert.equal("nil", results.missing1[2])
    assert.matches("NOT_FOUND", results.missing1[3])
    assert.equal("true", results.fine1[2], results.fine1.line)
    assert.equal(0, H.term(proc))
    assert.same({ "out-fine1" }, H.ids(H.drain(target)))
  end)

  it("gives two publishes in flight with the same message id each its own result", function()
    local q = H.queue("sameid")
    local target = H.queue("sameid-target")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local ok, err = warren.publish{ routing_key = body, body = "b", message_id = "same" }
        record(msg.message_id, tostring(ok), (tostring(err):gsub(" ", "_")))
      end]])
    H.publish(q, 1, { prefix = "routed", body = target })
    H.publish(q, 1, { prefix = "unroutable", body = "no-queue-by-this-name" })
    local proc = H.worker(script, q, { "-p", "2" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 2 end, 10, "both jobs")
    local results = {}
    for _, r in ipairs(H.records(rec)) do results[r[1]] = r end
    assert.equal("true", results.routed1[2], results.routed1.line)
    assert.equal("nil", results.unroutable1[2])
    assert.matches("NO_ROUTE", results.unroutable1[3])
    assert.equal(0, H.term(proc))
    assert.same({ "same" }, H.ids(H.drain(target)))
  end)

  it("answers a request with warren.reply to its reply_to and correlation_id", function()
    local q = H.queue("rpc")
    local replies = H.queue("rpc-replies")
    local script = H.script([[
      local warren = require "warren"
      function handle(body, msg)
        if body == "ask" then
          assert(warren.publish{ routing_key = msg.routing_key, body = "question",
                                 reply_to = os.getenv("REPLIES"), correlation_id = "c-42" })
        else
          assert(warren.reply(msg, "answer to " .. msg.correlation_id))
        end
      end]])
    H.publish(q, 1, { prefix = "ask", body = "ask" })
    local proc = H.worker(script, q, {}, { REPLIES = replies })
    H.wait_until(function() return H.depth(replies) == 1 end, 10, "the reply")
    assert.equal("answer to c-42", H.get_body(replies))
    assert.equal(0, H.term(proc))
  end)
end)

describe("retry", function()
  after_each(H.stop_all)

  local flaky = H.RECORD_LUA .. [[
    local warren = require "warren"
    function handle(body, msg)
      record(msg.message_id, msg.retries, now())
      if msg.retries < tonumber(body) then return warren.retry(0.3) end
    end]]

  it("delivers a message that fails twice three times, with a growing count, then acks it", function()
    local q = H.queue("flaky")
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "f", body = "2" })
    local proc = H.worker(H.script(flaky), q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 3 end, 15, "three deliveries")
    local recs = H.records(rec)
    assert.same({ "0", "1", "2" }, { recs[1][2], recs[2][2], recs[3][2] })
    assert.is_true(tonumber(recs[2][3]) - tonumber(recs[1][3]) >= 0.29, "retried too early")
    H.wait_until(function() return H.depth(q) == 0 and H.depth(q .. ".retry.300") == 0 end, 10,
      "queues empty")
    assert.equal(0, H.term(proc))
    assert.same({}, H.drain(q))
    assert.equal(3, #H.records(rec))
    H.delete_queue(q .. ".retry.300")
  end)

  it("rejects to the dead-letter queue past --max-retries", function()
    local q, dlq = H.queue("hopeless", { dead_letter = true })
    local rec = H.record_file()
    H.publish(q, 1, { prefix = "h", body = "99" })
    local proc = H.worker(H.script(flaky), q, { "--max-retries", "2" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return H.depth(dlq) == 1 end, 15, "dead-lettered")
    local recs = H.records(rec)
    assert.same({ "0", "1", "2" }, { recs[1][2], recs[2][2], recs[3][2] })
    assert.matches("rejecting instead", proc:log(), 1, true)
    assert.equal(0, H.term(proc))
    assert.same({ "h1" }, H.ids(H.drain(dlq)))
    assert.equal(0, (H.depth(q)))
    H.delete_queue(q .. ".retry.300")
  end)
end)
