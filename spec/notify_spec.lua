-- The service manager's notify protocol: a datagram socket stands in for
-- systemd, and sees READY, STATUS, WATCHDOG, RELOADING, READY, the quiet
-- stage's STATUS and STOPPING in that order.
local H = require "support.helper"
local unix = require "socket.unix"

-- A listening socket at a fresh path; :next() returns the next datagram as
-- a table of its assignments (and .text), or nil after timeout seconds.
local function listener()
  local path = H.tmpdir() .. "/notify"
  local sock = assert(unix.dgram())
  assert(sock:bind(path))
  local l = { path = path, seen = {} }
  function l:next(timeout)
    sock:settimeout(timeout or 5)
    local text = sock:receive()
    if not text then return nil end
    local fields = { text = text }
    for key, value in text:gmatch("([%u_]+)=([^\n]*)") do fields[key] = value end
    self.seen[#self.seen + 1] = text
    return fields
  end
  -- The next datagram that has key (whose value matches pattern, if given),
  -- skipping others, or an error.
  function l:until_has(key, timeout, pattern)
    local deadline = H.now() + (timeout or 10)
    while H.now() < deadline do
      local m = self:next(deadline - H.now())
      if m and m[key] and (not pattern or m[key]:match(pattern)) then return m end
    end
    error("no " .. key .. " within " .. (timeout or 10) .. " s; seen:\n"
      .. table.concat(self.seen, "\n---\n"))
  end
  function l:close() sock:close() end
  return l
end

describe("notify", function()
  after_each(H.stop_all)

  it("says READY, STATUS, WATCHDOG, RELOADING, READY and STOPPING in order", function()
    local q = H.queue("notify")
    local rec = H.record_file()
    local l = listener()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        record("job", msg.message_id)
        if body == "slow" then warren.sleep(0.5) end
      end]])
    local proc = H.worker(script, q, { "--no-watch" },
      { [H.RECORD_ENV] = rec, NOTIFY_SOCKET = l.path, WATCHDOG_USEC = 400000 })
    local ready = l:until_has("READY")
    assert.equal("1", ready.READY)
    assert.matches("^consuming '" .. q:gsub("%-", "%%-") .. "': 0 jobs in flight, 0 done$",
      ready.STATUS)
    H.publish(q, 3, { prefix = "n" })
    H.wait_until(function() return #H.records(rec) == 3 end, 10, "three jobs")
    -- A changed STATUS within a second or so.
    l:until_has("STATUS", 5, "^consuming .*: 0 jobs in flight, 3 done$")
    local t0 = H.now()
    l:until_has("WATCHDOG", 2)
    l:until_has("WATCHDOG", 2)
    assert.is_true(H.now() - t0 < 1.5, "two watchdog pings took " .. (H.now() - t0) .. " s")
    proc:signal("HUP")
    local reloading = l:until_has("RELOADING")
    assert.matches("^%d+$", reloading.MONOTONIC_USEC)
    assert.equal("1", l:until_has("READY").READY)
    proc:signal("USR1")
    l:until_has("STATUS", 5, "^quiet '")
    proc:signal("USR2")
    l:until_has("STATUS", 5, "^consuming '")
    H.publish(q, 1, { prefix = "slow", body = "slow" })
    H.wait_until(function() return #H.records(rec) == 4 end, 10, "the slow job")
    proc:signal("TERM")
    local stopping = l:until_has("STOPPING")
    assert.equal("1", stopping.STOPPING)
    -- The default drain timeout (5 s), the close (2 s) and a margin.
    assert.equal(tostring(8 * 1000000), stopping.EXTEND_TIMEOUT_USEC)
    assert.matches("^draining '.*': 1 job in flight", stopping.STATUS)
    assert.equal(0, proc:wait(10), proc:log())
    l:close()
  end)

  it("keeps NOTIFY_SOCKET from spawned programs, and is silent without it", function()
    local q = H.queue("notify-env")
    local rec = H.record_file()
    local l = listener()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local r = warren.spawn({ "sh", "-c", "echo \"[$NOTIFY_SOCKET][$WATCHDOG_USEC]\"" })
        record("env", (r.stdout:gsub("\n", "")))
      end]])
    local proc = H.worker(script, q, {},
      { [H.RECORD_ENV] = rec, NOTIFY_SOCKET = l.path, WATCHDOG_USEC = 10000000 })
    l:until_has("READY")
    H.publish(q, 1, { prefix = "e" })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "the job")
    assert.equal("[][]", H.records(rec)[1][2])
    assert.equal(0, H.term(proc))
    l:close()
    -- Without the variable nothing is sent and nothing is logged about it.
    local plain = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    H.publish(q, 1, { prefix = "p" })
    H.wait_until(function() return #H.records(rec) == 2 end, 10, "the second job")
    assert.equal(0, H.term(plain))
    assert.is_nil(plain:log():find("service manager", 1, true), plain:log())
  end)

  it("keeps the watchdog fed while a job computes where it cannot yield", function()
    local q = H.queue("notify-spin")
    local rec = H.record_file()
    local l = listener()
    local script = H.script(H.RECORD_LUA .. [[
      function handle(body, msg)
        record("start", msg.message_id, now())
        table.sort({ 2, 1 }, function(a, b)
          local t = os.clock()
          while os.clock() - t < 2 do end
          return a < b
        end)
        record("end", msg.message_id, now())
      end]])
    local proc = H.worker(script, q, {},
      { [H.RECORD_ENV] = rec, NOTIFY_SOCKET = l.path, WATCHDOG_USEC = 400000 })
    l:until_has("READY")
    H.publish(q, 1, { prefix = "s" })
    -- Read as they come, while the job computes: when each ping arrived.
    local times, deadline = {}, H.now() + 15
    while #H.records(rec) < 2 and H.now() < deadline do
      local m = l:next(0.1)
      if m and m.WATCHDOG then times[#times + 1] = H.now() end
    end
    assert.equal(2, #H.records(rec), "the job did not end")
    local worst = 0
    for i = 2, #times do worst = math.max(worst, times[i] - times[i - 1]) end
    -- A ping every 0.2 s; unfed, the 2 s of computation would show as a gap.
    assert.is_true(#times >= 8, #times .. " pings")
    assert.is_true(worst < 1, "a gap of " .. worst .. " s between pings")
    assert.equal(0, H.term(proc))
    l:close()
  end)
end)
