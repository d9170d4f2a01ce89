-- One worker, several queues: each queue has its handler and its own
-- prefetch, a slow queue does not hold another back, a broker cancel of one
-- leaves the others going, and drain, --until-empty, metrics and warren try
-- cover every queue. Outcomes are checked by message id.
local H = require "support.helper"
local http = require "socket.http"
local free_port, sample = H.free_port, H.sample

-- The records of one kind: {id = count} and the list of records.
local function by_id(rec, kind)
  local count, list = {}, {}
  for _, r in ipairs(H.records(rec)) do
    if r[1] == kind then
      count[r[2]] = (count[r[2]] or 0) + 1
      list[#list + 1] = r
    end
  end
  return count, list
end

local function concat(x, y)
  return table.move(y, 1, #y, #x + 1, table.move(x, 1, #x, 1, {}))
end

local function exactly_once(ids, count)
  for _, id in ipairs(ids) do
    assert.equal(1, count[id], "message " .. id .. " was handled " .. tostring(count[id]) .. " times")
  end
  local n = 0
  for _ in pairs(count) do n = n + 1 end
  assert.equal(#ids, n)
end

describe("several queues", function()
  after_each(H.stop_all)

  it("gives each queue its handler and prefetch; a slow queue does not hold the other back",
    function()
    local slow, fast = H.queue("slow"), H.queue("fast")
    local rec = H.record_file()
    local port = free_port()
    -- Each handler records how many jobs of its queue were running when it began.
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      local running = { slow = 0, fast = 0 }
      local function job(kind, seconds)
        return function(body, msg)
          running[kind] = running[kind] + 1
          record("start-" .. kind, msg.message_id, running[kind], msg.queue, now())
          warren.sleep(seconds)
          running[kind] = running[kind] - 1
          record("end-" .. kind, msg.message_id, now())
        end
      end
      handle = { [os.getenv("SLOW")] = job("slow", 0.4), [os.getenv("FAST")] = job("fast", 0.1) }
    ]])
    local proc = H.start(script, { "--url", H.url, "-q", slow .. ":1", "-q", fast, "--prefetch", 4,
      "--metrics", "127.0.0.1:" .. port }, { env = { [H.RECORD_ENV] = rec, SLOW = slow, FAST = fast } })
    proc:wait_log("consuming '" .. slow:gsub("%-", "%%-") .. "' %(prefetch 1%), '"
      .. fast:gsub("%-", "%%-") .. "' %(prefetch 4%) from", 10)
    local slow_ids = H.publish(slow, 4, { prefix = "s" })
    local fast_ids = H.publish(fast, 20, { prefix = "f" })
    H.wait_until(function()
      local s = by_id(rec, "end-slow")
      local n = 0
      for _ in pairs(s) do n = n + 1 end
      return n == 4
    end, 20, "four slow jobs")
    local fast_ends, fast_end_list = by_id(rec, "end-fast")
    local _, fast_starts = by_id(rec, "start-fast")
    local _, slow_starts = by_id(rec, "start-slow")
    exactly_once(fast_ids, fast_ends)
    exactly_once(slow_ids, (by_id(rec, "end-slow")))
    -- Each queue's prefetch bounds its own jobs.
    local most = { slow = 0, fast = 0 }
    for _, r in ipairs(slow_starts) do most.slow = math.max(most.slow, tonumber(r[3])) end
    for _, r in ipairs(fast_starts) do most.fast = math.max(most.fast, tonumber(r[3])) end
    assert.same({ slow = 1, fast = 4 }, most)
    for _, r in ipairs(slow_starts) do assert.equal(slow, r[4]) end
    for _, r in ipairs(fast_starts) do assert.equal(fast, r[4]) end
    -- Twenty fast jobs of 0.1 s, four at a time, ended while the slow queue, one at a time at
    -- 0.4 s each, had not started its last job.
    local last_fast = 0
    for _, r in ipairs(fast_end_list) do last_fast = math.max(last_fast, tonumber(r[3])) end
    local last_slow_start = 0
    for _, r in ipairs(slow_starts) do last_slow_start = math.max(last_slow_start, tonumber(r[5])) end
    assert.is_true(last_fast < last_slow_start,
      "the last fast job ended at " .. last_fast .. ", after the last slow one began at "
      .. last_slow_start)
    -- The metrics count each queue on its own.
    local text
    H.wait_until(function()
      local body = http.request("http://127.0.0.1:" .. port .. "/metrics")
      text = body
      return text and sample(text, 'warren_jobs_total{queue="' .. slow .. '",outcome="ack"}') == 4
    end, 10, "the metrics")
    assert.equal(20, sample(text, 'warren_jobs_total{queue="' .. fast .. '",outcome="ack"}'))
    assert.equal(20, sample(text, 'warren_deliveries_total{queue="' .. fast .. '",redelivered="false"}'))
    assert.equal(4, sample(text, 'warren_job_duration_seconds_count{queue="' .. slow .. '"}'))
    assert.equal(0, sample(text, 'warren_jobs_in_flight{queue="' .. fast .. '"}'))
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
    assert.same({ 0, 0 }, { (H.depth(slow)), (H.depth(fast)) })
  end)

  it("goes on with the other queues when the broker cancels one, and takes it back; a reload "
    .. "must keep every queue's handler", function()
    local a, b = H.queue("keep"), H.queue("gone")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg) record("done", msg.message_id, msg.queue) end]])
    local proc = H.start(script, { "--url", H.url, "-q", a .. "," .. b },
      { env = { [H.RECORD_ENV] = rec } })
    proc:wait_log("consuming '", 10)
    H.delete_queue(b)
    proc:wait_log("cancelled the consumer of '" .. b:gsub("%-", "%%-") .. "'", 10)
    local ids = H.publish(a, 5, { prefix = "a" })
    H.wait_until(function() return #H.records(rec) == 5 end, 10, "queue a's five")
    H.wtool({ "declare", b })
    proc:wait_log("consuming '" .. b:gsub("%-", "%%-") .. "' again", 10)
    local back = H.publish(b, 3, { prefix = "b" })
    H.wait_until(function() return #H.records(rec) == 8 end, 10, "queue b's three")
    local count = by_id(rec, "done")
    exactly_once(concat(ids, back), count)
    for _, r in ipairs(H.records(rec)) do
      assert.equal(r[2]:sub(1, 1) == "a" and a or b, r[3])
    end
    -- A reload that would leave a queue without a handler fails; the old version serves on.
    local mark = proc:mark()
    H.write_file(script, H.RECORD_LUA .. "handle = { [" .. H.lua_string(a) .. "] = function() end }")
    proc:wait_log("reload %(%S+ changed%) failed, version 1 keeps serving: .*no handler for queue '"
      .. b:gsub("%-", "%%-") .. "'", 10, mark)
    H.publish(b, 1, { prefix = "late" })
    H.wait_until(function() return #H.records(rec) == 9 end, 10, "queue b's message on version 1")
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
  end)

  it("drains jobs of every queue on SIGTERM, and --until-empty waits for every queue", function()
    local a, b = H.queue("drain-a"), H.queue("drain-b")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        warren.sleep(tonumber(body))
        record("done", msg.message_id)
      end]])
    -- Both queues have a job in flight when the signal comes; both finish and are acked.
    local proc = H.start(script, { "--url", H.url, "-q", a, "-q", b },
      { env = { [H.RECORD_ENV] = rec } })
    proc:wait_log("consuming '", 10)
    H.publish(a, 1, { prefix = "a", body = "0.5" })
    H.publish(b, 1, { prefix = "b", body = "0.5" })
    H.wait_until(function()
      local ra, ca = H.depth(a)
      local rb, cb = H.depth(b)
      return ra == 0 and rb == 0 and ca == 1 and cb == 1
    end, 10, "both taken")
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
    assert.same({ "a1", "b1" }, H.ids(H.records(rec)))
    assert.same({ 0, 0 }, { (H.depth(a)), (H.depth(b)) })
    -- --until-empty ends once both queues are empty, not the first.
    local rec2 = H.record_file()
    local ids_a = H.publish(a, 3, { prefix = "ea", body = "0" })
    local ids_b = H.publish(b, 6, { prefix = "eb", body = "0.1" })
    proc = H.start(script, { "--url", H.url, "-q", a .. ":1", "-q", b .. ":1", "--until-empty" },
      { env = { [H.RECORD_ENV] = rec2 } })
    assert.equal(0, proc:wait(20), proc:log())
    assert.matches("queues '" .. a:gsub("%-", "%%-") .. "', '" .. b:gsub("%-", "%%-")
      .. "' are empty %(%-%-until%-empty%)", proc:log())
    exactly_once(concat(ids_a, ids_b), (by_id(rec2, "done")))
  end)

  it("tries a fixture on the handler of its queue", function()
    local script = H.script([[
      handle = {
        img = function(body, msg) print("img " .. body .. " " .. msg.queue) end,
        mail = function(body, msg) print("mail " .. body .. " " .. msg.queue) end,
      }]])
    local fixtures = H.tmpdir() .. "/m.jsonl"
    H.write_file(fixtures, '{"body":"a","queue":"img"}\n{"body":"b","queue":"mail"}\n')
    local code, out = H.run({ "try", "--messages", fixtures, script })
    assert.equal(0, code, out)
    assert.matches("img a img\n", out, 1, true)
    assert.matches("mail b mail\n", out, 1, true)
    -- Bodies on the command line go to the queue of --queue.
    code, out = H.run({ "try", "-q", "mail", script, "c" })
    assert.equal(0, code, out)
    assert.matches("mail c mail\n", out, 1, true)
    -- Without one, the message has no handler, and try says how to name its queue.
    code, out = H.run({ "try", script, "d" })
    assert.equal(1, code, out)
    assert.matches("a handler per queue: name the message's queue", out, 1, true)
  end)
end)
