-- A script or a message cannot crash, wedge or silently end the host: waits
-- where a coroutine cannot yield are refused before they arm anything,
-- hostile error objects and headers are handled, os.exit is refused, and
-- the exit code is decided once.
local H = require "support.helper"

local function by_id(rec)
  local out = {}
  for _, r in ipairs(H.records(rec)) do out[r[1]] = r end
  return out
end

describe("safety", function()
  after_each(H.stop_all)

  it("refuses a wait in a <close> handler of a failed job, and goes on", function()
    local q, dlq = H.queue("closer", { dead_letter = true })
    local script = H.script([[
      local warren = require "warren"
      function handle(body, msg)
        local guard <close> = setmetatable({}, { __close = function() warren.sleep(0.1) end })
        error("boom")
      end]])
    H.publish(q, 2, { prefix = "c" })
    local proc = H.worker(script, q, { "--on-error", "reject" })
    H.wait_until(function() return H.depth(dlq) == 2 end, 10, "both dead-lettered")
    assert.matches("warren.sleep cannot wait", proc:log(), 1, true)
    assert.equal(0, H.term(proc), proc:log())
    assert.same({ "c1", "c2" }, H.ids(H.drain(dlq)))
  end)

  it("refuses a wait in a <close> handler when the forced stage interrupts the job", function()
    local q = H.queue("closer-forced")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local guard <close> = setmetatable({}, { __close = function()
          local ok, err = pcall(warren.publish, { routing_key = "x", body = "y" })
          record("closer", tostring(ok))
        end })
        record("started")
        warren.sleep(30)
      end]])
    H.publish(q, 1, { prefix = "f" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return by_id(rec).started end, 10, "the job")
    proc:signal("TERM")
    proc:signal("TERM")
    assert.equal(75, proc:wait(5), proc:log())
    assert.same({ "closer", "false" }, { by_id(rec).closer[1], by_id(rec).closer[2] })
    H.wait_until(function() return H.depth(q) == 1 end, 10, "the message handed back")
  end)

  it("refuses sleep and publish in a sort comparator; later waits are exact", function()
    local q = H.queue("sort")
    local target = H.queue("sort-target")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local ok1, e1 = pcall(table.sort, { 3, 1, 2 }, function(a, b) warren.sleep(0.5); return a < b end)
        local ok2, e2 = pcall(table.sort, { 3, 1, 2 }, function(a, b)
          warren.publish{ routing_key = os.getenv("TARGET"), body = "no" }; return a < b end)
        record("refused", tostring(ok1), tostring(ok2), tostring(e1):find("cannot wait here", 1, true) ~= nil)
        local t0 = now()
        warren.sleep(0.3)
        record("slept", now() - t0)
        record("published", tostring(warren.publish{ routing_key = os.getenv("TARGET"), body = "yes" }))
      end]])
    H.publish(q, 1, { prefix = "s" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec, TARGET = target })
    H.wait_until(function() return by_id(rec).published end, 10, "the job")
    local r = by_id(rec)
    assert.same({ "false", "false", "true" }, { r.refused[2], r.refused[3], r.refused[4] })
    assert.is_true(tonumber(r.slept[2]) >= 0.3, "slept only " .. r.slept[2])
    assert.equal("true", r.published[2])
    assert.equal(0, H.term(proc))
    assert.equal(1, (H.depth(target)))
  end)

  it("survives an error object whose __tostring raises", function()
    local q, dlq = H.queue("tostring", { dead_letter = true })
    local script = H.script([[
      function handle(body, msg)
        error(setmetatable({}, { __tostring = function() error("x") end }))
      end]])
    H.publish(q, 1, { prefix = "t" })
    local proc = H.worker(script, q, { "--on-error", "reject" })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "dead-lettered")
    assert.is_true(proc:running())
    assert.matches("description itself failed", proc:log(), 1, true)
    assert.equal(0, H.term(proc))
  end)

  it("refuses os.exit in a job", function()
    local q, dlq = H.queue("exit", { dead_letter = true })
    local script = H.script([[
      function handle(body, msg) os.exit(3) end]])
    H.publish(q, 1, { prefix = "e" })
    local proc = H.worker(script, q, { "--on-error", "reject" })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "dead-lettered")
    assert.matches("os.exit is not available", proc:log(), 1, true)
    assert.equal(0, H.term(proc))
  end)

  it("refuses to resume or close another job's coroutine, which is reused once it returned",
    function()
    local q = H.queue("othercoroutine")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      local first
      function handle(body, msg)
        if body == "first" then
          first = coroutine.running()
          warren.sleep(0.5)
          record("woke", msg.message_id)
        else
          local ok, err = pcall(coroutine.resume, first, "early")
          local closed, cerr = pcall(coroutine.close, first)
          record("tried", msg.message_id, tostring(ok), tostring(closed), (err:gsub("%s", "_")))
        end
      end]])
    local proc = H.worker(script, q, { "--prefetch", 2 }, { [H.RECORD_ENV] = rec })
    H.publish(q, 1, { prefix = "first", body = "first" })
    H.publish(q, 1, { prefix = "second", body = "second" })
    H.wait_until(function() return #H.records(rec) == 2 end, 10, "both jobs")
    local by = by_id(rec)
    assert.same({ "tried", "second1", "false", "false" }, { table.unpack(by.tried, 1, 4) })
    assert.matches("a_job's_own_coroutine_is_resumed_and_closed_by_warren_only", by.tried[5], 1, true)
    assert.equal("first1", by.woke[2]) -- woke from its own sleep, once
    assert.equal(0, H.term(proc), proc:log())
    assert.same({}, H.drain(q))
  end)

  it("keeps serving when a reload sets package to nil", function()
    local q = H.queue("nopkg")
    local rec = H.record_file()
    local dir = H.tmpdir()
    local path = dir .. "/job.lua"
    H.write_file(path, H.RECORD_LUA .. [[ function handle(body, msg) record("v1", msg.message_id) end]])
    local code, out = H.run({ "check", path })
    assert.equal(0, code, out)
    local proc = H.worker(path, q, { "--no-watch" }, { [H.RECORD_ENV] = rec })
    H.write_file(path, H.RECORD_LUA .. [[ package = nil
      function handle(body, msg) record("v2", msg.message_id) end]])
    code, out = H.run({ "check", path })
    assert.equal(0, code, out)
    proc:signal("HUP")
    proc:wait_log("reload", 10)
    H.publish(q, 1, { prefix = "p" })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "the job")
    assert.is_true(proc:running())
    assert.equal(0, H.term(proc))
  end)

  it("rejects a message whose headers nest 5000 deep, with a log line", function()
    local q, dlq = H.queue("deep", { dead_letter = true })
    local script = H.script("function handle(body, msg) end")
    local proc = H.worker(script, q)
    H.wtool({ "publish", q, "--count", 1, "--prefix", "deep", "--nested-header", "n=5000" })
    H.wait_until(function() return H.depth(dlq) == 1 end, 10, "dead-lettered")
    assert.matches("deep.*rejected.*nest deeper than 100 levels", proc:log())
    H.publish(q, 1, { prefix = "fine" })
    H.wait_until(function() return H.depth(q) == 0 end, 10, "a later message")
    assert.equal(0, H.term(proc))
    assert.same({ "deep1" }, H.ids(H.drain(dlq)))
  end)

  it("exits 75 when SIGINT and SIGTERM come together during a drain", function()
    local q = H.queue("twosig")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg) record("started"); warren.sleep(30) end]])
    H.publish(q, 1, { prefix = "z" })
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "the job")
    proc:signal("TERM")
    proc:wait_log("draining", 5)
    os.execute("kill -INT " .. proc.pid .. "; kill -TERM " .. proc.pid)
    assert.equal(75, proc:wait(5), proc:log())
  end)
  -- Computation where the job's coroutine cannot yield: the count hook keeps
  -- heartbeats going and obeys the forced stage from inside it.
  local spinners = {
    ["a nested coroutine"] = "coroutine.wrap(function() spin(s) end)()",
    ["a sort comparator"] = "table.sort({ 2, 1 }, function(a, b) spin(s); return a < b end)",
    ["a gsub callback"] = "local _ = ('x'):gsub('x', function() spin(s) end)",
  }
  for name, call in pairs(spinners) do
    it("keeps the connection through 5 s of computation in " .. name .. ", then obeys two signals", function()
      local q = H.queue("spin")
      local rec = H.record_file()
      local script = H.script(H.RECORD_LUA .. [[
        local function spin(s)
          local t = os.clock()
          while s == "forever" or os.clock() - t < s do end
        end
        function handle(body, msg)
          local s = tonumber(body) or body
          record("start", msg.message_id)
          ]] .. call .. [[

          record("done", msg.message_id)
        end]])
      H.publish(q, 1, { prefix = "five", body = "5" })
      H.publish(q, 1, { prefix = "ever", body = "forever" })
      local proc = H.worker(script, q, { "--heartbeat", 1 }, { [H.RECORD_ENV] = rec })
      H.wait_until(function()
        for _, r in ipairs(H.records(rec)) do
          if r[1] == "start" and r[2] == "ever1" then return true end
        end
      end, 20, "the first job done, the second spinning")
      assert.is_nil(proc:log():find("connection lost", 1, true), proc:log())
      local t0 = H.now()
      proc:signal("TERM")
      proc:signal("TERM")
      assert.equal(75, proc:wait(5), proc:log())
      assert.is_true(H.now() - t0 < 1.5, "exit took " .. (H.now() - t0) .. " s")
      assert.matches("interrupting 1 job\n.*handed back 1 message;", proc:log())
      H.wait_until(function() return H.depth(q) == 1 end, 10, "the spinning job's message back")
      assert.same({ "ever1" }, H.ids(H.drain(q)))
    end)
  end

  -- A reload whose main chunk never ends: sliced like a job where it can
  -- yield, and ended after 5 s however it catches errors.
  it("keeps a ticking job's gaps under 100 ms while a pcall-looping reload runs out its 5 s",
    function()
    local q = H.queue("tick")
    local rec = H.record_file()
    local script = H.script(H.TICKER_LUA)
    local proc = H.worker(script, q, { "--no-watch" }, { [H.RECORD_ENV] = rec })
    H.publish(q, 1, { prefix = "ticker", body = "9" })
    H.wait_until(function() return by_id(rec).tick end, 10, "ticking")
    local mark = proc:mark()
    H.write_file(script, "while true do pcall(function() while true do end end) end\n")
    proc:signal("HUP")
    proc:wait_log("reload %(SIGHUP%) failed, version 1 keeps serving: [^\n]*:1: still loading "
      .. "after 5 s", 15, mark)
    H.wait_until(function() return by_id(rec)["end"] end, 15, "the ticker to end")
    local ticks, worst = H.largest_gap(rec)
    assert.is_true(ticks > 100, ticks .. " ticks")
    assert.is_true(worst < 0.1, "a gap of " .. worst .. " s")
    assert.equal(0, H.term(proc))
  end)

  it("ends a reload that loops with pcall behind a C function, and obeys two signals in it",
    function()
    local q = H.queue("tick-sort")
    local rec = H.record_file()
    local script = H.script(H.TICKER_LUA)
    local proc = H.worker(script, q, { "--no-watch", "--heartbeat", "1", "--log-level", "debug" },
      { [H.RECORD_ENV] = rec })
    local spin = "table.sort({ 3, 1, 2 }, function(a, b)\n"
      .. "  while true do pcall(function() while true do end end) end\nend)\n"
    local mark = proc:mark()
    H.write_file(script, spin)
    proc:signal("HUP")
    proc:wait_log("reload %(SIGHUP%) failed, version 1 keeps serving: [^\n]*:2: still loading "
      .. "after 5 s", 15, mark)
    H.publish(q, 1, { prefix = "after", body = "0" })
    H.wait_until(function() return by_id(rec)["end"] end, 10, "a job of version 1")
    assert.is_nil(proc:log():find("connection lost", 1, true), proc:log())
    mark = proc:mark()
    proc:signal("HUP")
    proc:wait_log("reload %(SIGHUP%): loading version 3", 5, mark)
    local t0 = H.now()
    proc:signal("TERM")
    proc:signal("TERM")
    assert.equal(75, proc:wait(5), proc:log())
    assert.is_true(H.now() - t0 < 1.5, "exit took " .. (H.now() - t0) .. " s")
    assert.matches("stopped while loading", proc:log(), 1, true)
  end)
end)
