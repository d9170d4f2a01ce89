-- Surviving the broker and the network: restarts, closed connections, a
-- black-holed link, a deleted queue, a late broker, a dead cluster node.
-- Nothing may be lost; a message may run twice only when redelivered.
local H = require "support.helper"

local function start(script, args, env)
  return H.start(script, args, { env = env })
end

local function consuming(queue, proc)
  H.wait_until(function()
    local _, consumers = H.depth(queue)
    return consumers == 1 or not proc:running()
  end, 30, "warren consuming " .. queue)
  assert(proc:running(), "warren exited:\n" .. proc:log())
end

-- A handler that records each run and takes a little time.
local recorder = H.RECORD_LUA .. [[
  local warren = require "warren"
  function handle(body, msg)
    warren.sleep(tonumber(body) or 0)
    record(msg.message_id, tostring(msg.redelivered))
  end]]

-- Every id ran at least once, and every repeat run was a redelivery.
local function assert_each_once_or_redelivered(ids, records)
  local runs = {}
  for _, r in ipairs(records) do
    runs[r[1]] = runs[r[1]] or {}
    table.insert(runs[r[1]], r[2])
  end
  local repeats = 0
  for _, id in ipairs(ids) do
    local r = runs[id]
    assert.is_not_nil(r, "lost: " .. id)
    for i = 2, #(r or {}) do
      assert.equal("true", r[i], id .. " ran again without being redelivered")
      repeats = repeats + 1
    end
  end
  return repeats
end

local function all_done(q, rec, ids)
  H.wait_until(function()
    local seen, n = {}, 0
    for _, r in ipairs(H.records(rec)) do
      if not seen[r[1]] then seen[r[1]] = true; n = n + 1 end
    end
    return n == #ids and H.depth(q) == 0
  end, 90, "every message handled and the queue empty")
end

describe("resilience", function()
  after_each(H.stop_all)

  -- 2000 messages; once 300 are handled, disrupt(proc) breaks the connection and
  -- waits for warren to come back. Every message must be handled, and any
  -- repeat must be a redelivery.
  local function mid_stream(name, seconds, disrupt)
    local q = H.queue(name)
    local rec = H.record_file()
    local ids = H.publish(q, 2000, { prefix = name, body = seconds })
    local proc = start(H.script(recorder), { "-u", H.url, "-q", q, "-p", "25" },
      { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) >= 300 end, 30, "300 handled")
    disrupt(proc)
    all_done(q, rec, ids)
    assert_each_once_or_redelivered(ids, H.records(rec))
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    assert.same({}, H.drain(q))
  end

  it("loses nothing when the broker application stops and starts mid-stream", function()
    mid_stream("restart", "0.05", function(proc)
      finally(function() H.ctl("start_app") end)
      assert(H.ctl("stop_app"))
      proc:wait_log("connection lost", 15)
      assert(H.ctl("start_app"))
      proc:wait_log("reconnected", 60)
    end)
  end)

  it("loses nothing when the broker closes the connection mid-stream", function()
    mid_stream("closed", "0.01", function(proc)
      assert(H.ctl("close_all_connections", "spec closes it"))
      proc:wait_log("spec closes it", 10)
      proc:wait_log("reconnected", 20)
    end)
  end)

  it("detects a black-holed connection within about two heartbeats and comes back", function()
    local q = H.queue("blackhole")
    local rec = H.record_file()
    local proxy = H.proxy(H.url)
    local proc = start(H.script(recorder), { "-u", proxy.url, "-q", q, "--heartbeat", "1" },
      { [H.RECORD_ENV] = rec })
    consuming(q, proc)
    local mark = proc:mark()
    local t0 = H.now()
    proxy:hold()
    proc:wait_log("no heartbeat from the broker", 10, mark)
    local took = H.now() - t0
    assert.is_true(took < 3.5, "loss detected after " .. took .. " s")
    proxy:pass()
    proc:wait_log("reconnected", 30, mark)
    local ids = H.publish(q, 5, { prefix = "after" })
    all_done(q, rec, ids)
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    proxy:stop()
  end)

  it("resumes consuming when its queue is deleted and created again", function()
    local q = H.queue("deleted")
    local rec = H.record_file()
    local proc = start(H.script(recorder), { "-u", H.url, "-q", q }, { [H.RECORD_ENV] = rec })
    consuming(q, proc)
    H.delete_queue(q)
    proc:wait_log("cancelled the consumer", 10)
    assert.is_true(proc:running())
    H.wtool({ "declare", q })
    consuming(q, proc)
    local ids = H.publish(q, 3, { prefix = "back" })
    all_done(q, rec, ids)
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
  end)

  it("waits for a broker that is not up yet, then consumes", function()
    local q = H.queue("late")
    local rec = H.record_file()
    local proxy = H.proxy(H.url)
    proxy:refuse()
    local proc = start(H.script(recorder), { "-u", proxy.url, "-q", q },
      { [H.RECORD_ENV] = rec })
    proc:wait_log("retrying with backoff", 10)
    assert.is_true(proc:running())
    proxy:pass()
    consuming(q, proc)
    local ids = H.publish(q, 3, { prefix = "late" })
    all_done(q, rec, ids)
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    proxy:stop()
  end)

  it("exits promptly on a signal while waiting to reconnect", function()
    local proxy = H.proxy(H.url)
    proxy:refuse()
    local proc = start(H.script(recorder), { "-u", proxy.url, "-q", "none" })
    proc:wait_log("retrying with backoff", 10)
    local t0 = H.now()
    proc:signal("TERM")
    assert.equal(0, proc:wait(5))
    assert.is_true(H.now() - t0 < 1, "exit took " .. (H.now() - t0) .. " s")
    proxy:stop()
  end)

  it("fails over to the next --url when the first node is dead", function()
    local q = H.queue("failover")
    local rec = H.record_file()
    local dead = "amqp://guest:guest@127.0.0.1:1/"
    local proc = start(H.script(recorder), { "-u", dead, "-u", H.url, "-q", q },
      { [H.RECORD_ENV] = rec })
    consuming(q, proc)
    local ids = H.publish(q, 3, { prefix = "fo" })
    all_done(q, rec, ids)
    assert.matches("consuming '" .. q .. "' from amqp://guest@127.0.0.1:" .. H.url:match(":(%d+)"),
      proc:log(), 1, true)
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
  end)
end)
