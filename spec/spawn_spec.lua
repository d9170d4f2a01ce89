-- warren.spawn: child processes that a job waits for without blocking the loop, with real
-- programs and a real broker.
local H = require "support.helper"
local cjson = require "cjson"

-- True while a process with this pid exists, zombies included (kill -0 succeeds on them).
local function alive(pid)
  local ok = os.execute("kill -0 " .. pid .. " 2>/dev/null")
  return ok == true
end

-- The records whose first field is kind, by message id (field 2).
local function by_id(records, kind)
  local out = {}
  for _, r in ipairs(records) do
    if r[1] == kind then out[r[2]] = r end
  end
  return out
end

describe("warren.spawn", function()
  after_each(H.stop_all)

  it("runs 20 one-second children at once at prefetch 20 and captures each one's output", function()
    local q = H.queue("spawn20")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        local t0 = now()
        local r = assert(warren.spawn({ "sh", "-c", "sleep 1; echo out-$ID; echo err-$ID >&2" },
          { env = { ID = msg.message_id } }))
        record("done", msg.message_id, t0, now(), tostring(r.ok), r.status,
          (r.stdout:gsub("\n", "|")), (r.stderr:gsub("\n", "|")))
      end]])
    local ids = H.publish(q, 20, { prefix = "s" })
    local proc = H.worker(script, q, { "--prefetch", "20" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 20 end, 15, "20 spawning jobs")
    local done = by_id(H.records(rec), "done")
    local first, last = math.huge, 0
    for _, id in ipairs(ids) do
      local r = assert(done[id], "no result for " .. id)
      assert.same({ "true", "0", "out-" .. id .. "|", "err-" .. id .. "|" },
        { r[5], r[6], r[7], r[8] })
      first = math.min(first, tonumber(r[3]))
      last = math.max(last, tonumber(r[4]))
      assert.is_true(tonumber(r[4]) - tonumber(r[3]) >= 1, id .. " did not wait for its child")
    end
    -- One after the other they would take 20 s; starting 20 at once costs up to 1.5 s
    -- (times H.slow).
    local span = last - first
    assert.is_true(span < 1 + 1.5 * H.slow, "20 one-second children took " .. span .. " s")
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
    assert.same({}, H.drain(q))
  end)

  -- One message per case; the job runs the case and records its outcome as JSON.
  local cases_script = H.RECORD_LUA .. [[
    local warren = require "warren"
    local cjson = require "cjson"
    local big = string.rep("0123456789abcdef", 40000) -- 640 000 bytes, over any pipe buffer
    local cases = {
      status = function() return warren.spawn({ "sh", "-c", "echo partial; exit 7" }) end,
      killed = function() return warren.spawn({ "sh", "-c", "kill -KILL $$" }) end,
      stdin = function() return warren.spawn({ "cat" }, { stdin = "line1\nline2\0bin\255" }) end,
      big_stdin = function() return warren.spawn({ "cat" }, { stdin = big }) end,
      no_stdin = function() return warren.spawn({ "wc", "-c" }) end,
      cwd = function() return warren.spawn({ "pwd", "-P" }, { cwd = os.getenv("SPAWN_DIR") }) end,
      env = function()
        return warren.spawn({ "sh", "-c", "echo $A-$B-${HOME-unset}-$INHERITED" },
          { env = { A = "1", B = 2, HOME = false } })
      end,
      timeout = function() return warren.spawn({ "sleep", "10" }, { timeout = 0.5 }) end,
      stubborn = function()
        return warren.spawn({ "sh", "-c", "trap '' TERM; sleep 5" }, { timeout = 0.3 })
      end,
      missing = function() return warren.spawn({ "no-such-program-for-warren", "x" }) end,
      bad_cwd = function() return warren.spawn({ "true" }, { cwd = "/nonexistent/dir" }) end,
      truncated = function()
        return warren.spawn({ "sh", "-c", "head -c 3000000 /dev/zero; echo tail >&2" })
      end,
      clean_child = function()
        return warren.spawn({ "sh", "-c",
          "echo $$ $(cut -d' ' -f5 /proc/$$/stat); ls /proc/self/fd | tr '\\n' ' '; echo; "
          .. "exec grep -E '^Sig(Blk|Ign)' /proc/self/status" })
      end,
      bad_args = function()
        local errs = {}
        for _, args in ipairs({ { {} }, { { "true" }, { tiemout = 1 } }, { { "true", {} } },
                                { { "true" }, { timeout = -1 } }, { "true" } }) do
          local ok, err = pcall(warren.spawn, table.unpack(args))
          errs[#errs + 1] = ok and "no error" or err
        end
        return { errors = errs }
      end,
    }
    function handle(body, msg)
      local t0 = now()
      local r, err = cases[body]()
      local out = { elapsed = now() - t0, err = err, result = type(r) }
      if r then
        for k, v in pairs(r) do out[k] = v end
        if r.stdout and #r.stdout > 1000 then
          out.stdout_len, out.stdout_same = #r.stdout, r.stdout == big
          out.stdout = nil
        end
      end
      record(msg.message_id, cjson.encode(out))
    end]]

  it("reports status, stdin, cwd, env, timeouts, failures to start and truncation", function()
    local q = H.queue("spawncases")
    local rec = H.record_file()
    local dir = H.tmpdir()
    local names = { "status", "killed", "stdin", "big_stdin", "no_stdin", "cwd", "env", "timeout",
      "stubborn", "missing", "bad_cwd", "truncated", "clean_child", "bad_args" }
    for _, name in ipairs(names) do H.publish(q, 1, { prefix = name, body = name }) end
    local proc = H.worker(H.script(cases_script), q, { "--prefetch", #names },
      { [H.RECORD_ENV] = rec, SPAWN_DIR = dir, INHERITED = "yes" })
    H.wait_until(function() return #H.records(rec) == #names end, 15, "every case")
    local got = {}
    for _, r in ipairs(H.records(rec)) do
      got[r[1]:gsub("1$", "")] = cjson.decode(r.line:match("^%S+ (.*)$"))
    end

    local r = got.status
    assert.same({ false, 7, "partial\n", "", false, false },
      { r.ok, r.status, r.stdout, r.stderr, r.timed_out, r.truncated })
    assert.is_nil(r.signal)

    assert.is_nil(got.killed.status)
    assert.equal(9, got.killed.signal)
    assert.is_false(got.killed.ok)

    assert.equal("line1\nline2\0bin\255", got.stdin.stdout)
    assert.equal(640000, got.big_stdin.stdout_len)
    assert.is_true(got.big_stdin.stdout_same)
    assert.equal("0\n", got.no_stdin.stdout)

    local p = io.popen("cd " .. H.quote(dir) .. " && pwd -P")
    local real = p:read("l")
    p:close()
    assert.equal(real .. "\n", got.cwd.stdout)
    assert.equal("1-2-unset-yes\n", got.env.stdout)

    r = got.timeout
    assert.same({ false, true, 15 }, { r.ok, r.timed_out, r.signal })
    assert.is_nil(r.status)
    assert.is_true(r.elapsed >= 0.5 and r.elapsed < 1.5, "timeout after " .. r.elapsed .. " s")
    r = got.stubborn -- ignores SIGTERM: SIGKILL after the one-second grace
    assert.same({ true, 9 }, { r.timed_out, r.signal })
    assert.is_true(r.elapsed >= 1.2 and r.elapsed < 2.5, "killed after " .. r.elapsed .. " s")

    assert.equal("nil", got.missing.result)
    assert.matches("cannot run 'no-such-program-for-warren': No such file or directory",
      got.missing.err, 1, true)
    assert.equal("nil", got.bad_cwd.result)
    assert.matches("cannot change directory to '/nonexistent/dir'", got.bad_cwd.err, 1, true)

    r = got.truncated
    assert.same({ 1048576, true, "tail\n", 0, true }, { r.stdout_len, r.truncated, r.stderr,
      r.status, r.ok })

    -- Its own process group, no blocked or ignored signal (warren was started by a shell that
    -- ignores SIGINT), and no descriptor but 0, 1, 2 (and ls's own 3). The signals are read by
    -- the child itself (the shell execs grep): a shell waiting for a command it started blocks
    -- signals for a moment, so another process reading them could see that. Signals 32 and 33 are
    -- glibc's own, which glibc lets no program reset; posix_spawn (os.execute) leaves them
    -- ignored in the processes it starts, and so in warren and its children.
    local out = got.clean_child.stdout
    local pid, pgid = out:match("^(%d+) (%d+)\n")
    assert.equal(pid, pgid)
    assert.matches("SigBlk:%s+0+\n", out)
    local ignored = tonumber(assert(out:match("SigIgn:%s+(%x+)\n")), 16)
    assert.equal(0, ignored & ~(3 << 31), "ignored signals: " .. out)
    assert.matches("\n0 1 2 3 \n", out)

    local errs = got.bad_args.errors
    assert.matches("non-empty list", errs[1], 1, true)
    assert.matches("unknown option 'tiemout'", errs[2], 1, true)
    assert.matches("argv[2] must be a string, got table", errs[3], 1, true)
    assert.matches("opts.timeout must be a positive number", errs[4], 1, true)
    assert.matches("table expected, got string", errs[5], 1, true)

    H.wait_until(function() return H.depth(q) == 0 end, 10, "every case acked")
    assert.equal(0, H.term(proc))
    assert.same({}, H.drain(q))
  end)

  it("refuses to run outside a job, with a clear error", function()
    local script = H.script([[
      local warren = require "warren"
      warren.spawn({ "true" })
      function handle() end]])
    local code, out = H.run({ "check", script })
    assert.equal(78, code)
    assert.matches("warren.spawn can only be called from a job's own coroutine", out, 1, true)
  end)

  it("leaves io.popen and os.execute their exit status across a wait, beside a spawn", function()
    local q = H.queue("popen")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        if body == "spawn" then
          local r = assert(warren.spawn({ "sh", "-c", "sleep 0.1; exit 5" }))
          record(msg.message_id, "spawn", r.status)
          return
        end
        local f = io.popen("echo out; exit 3")
        warren.sleep(0.3) -- the child exits, and SIGCHLD arrives, while the loop runs
        local text = f:read("a")
        local ok, how, code = f:close()
        record(msg.message_id, "popen", tostring(ok), how, code, (text:gsub("\n", "|")))
        ok, how, code = os.execute("exit 4")
        record(msg.message_id, "execute", tostring(ok), how, code)
      end]])
    H.publish(q, 1, { prefix = "p", body = "popen" })
    H.publish(q, 1, { prefix = "s", body = "spawn" })
    local proc = H.worker(script, q, { "--prefetch", "2" }, { [H.RECORD_ENV] = rec })
    H.wait_until(function() return #H.records(rec) == 3 end, 10, "both jobs")
    local got = {}
    for _, r in ipairs(H.records(rec)) do got[r[1] .. " " .. r[2]] = table.concat(r, " ", 3) end
    assert.same({
      ["p1 popen"] = "nil exit 3 out|",
      ["p1 execute"] = "nil exit 4",
      ["s1 spawn"] = "5",
    }, got)
    assert.equal(0, H.term(proc))
  end)

  -- A job whose child writes a pid to $PIDFILE (renamed into place) and sleeps 30 s, as MODE says:
  -- plain: the child becomes the sleep; stubborn: likewise, ignoring SIGTERM; orphan: the child
  -- exits at once and leaves the sleep, ignoring SIGTERM, holding its stdout (the job waits on).
  local pid_script = H.RECORD_LUA .. [[
    local warren = require "warren"
    local function publish(pid) return "echo " .. pid .. " > $PIDFILE.tmp && mv $PIDFILE.tmp $PIDFILE" end
    local commands = {
      plain = publish("$$") .. "; exec sleep 30",
      stubborn = "trap '' TERM; " .. publish("$$") .. "; exec sleep 30",
      orphan = "(trap '' TERM; exec sleep 30) & " .. publish("$!"),
    }
    function handle(body, msg)
      local guard <close> = setmetatable({}, {
        __close = function() record("closed", msg.message_id) end })
      record("start", msg.message_id, tostring(msg.redelivered))
      if msg.redelivered then return end
      local r = warren.spawn({ "sh", "-c", commands[os.getenv("MODE")] })
      record("end", msg.message_id, tostring(r and r.signal))
    end]]

  local function wait_pid(path)
    return H.wait_until(function()
      local text = H.read_file(path)
      return text and tonumber(text)
    end, 10, "the pid in " .. path)
  end

  -- True while the process runs: exists and is not a zombie. An orphan's zombie waits for an
  -- init that may never reap it, so for a grandchild of warren this is the test.
  local function running(pid)
    local stat = H.read_file("/proc/" .. pid .. "/stat")
    return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
  end

  for _, mode in ipairs({ "plain", "stubborn", "orphan" }) do
    it("leaves no process behind when two signals force exit during a spawn (" .. mode .. ")",
      function()
        local q = H.queue("spawnforce")
        local rec = H.record_file()
        local pidfile = H.tmpdir() .. "/pid"
        local env = { [H.RECORD_ENV] = rec, PIDFILE = pidfile, MODE = mode }
        local proc = H.worker(H.script(pid_script), q, {}, env)
        H.publish(q, 1, { prefix = "f" })
        local pid = wait_pid(pidfile)
        assert.is_true(running(pid), "the sleep is not running")
        local took = H.force(proc)
        assert.is_true(took < 1.5, "forced exit took " .. took .. " s")
        if mode == "orphan" then
          H.wait_until(function() return not running(pid) end, 2, "sleep " .. pid .. " to end")
        else
          -- warren reaps before it exits: no process, not even a zombie, has that pid.
          H.wait_until(function() return not alive(pid) end, 2, "child " .. pid .. " to be gone")
        end
        local recs = H.records(rec)
        assert.is_not_nil(by_id(recs, "closed").f1, "the <close> variable did not run")
        assert.is_nil(by_id(recs, "end").f1, "the job went on after the forced exit")
        H.wait_until(function() return H.depth(q) == 1 end, 10, "the message back in the queue")
        local back = H.drain(q)
        assert.equal("f1", back[1].id)
      end)
  end

  for _, mode in ipairs({ "plain", "stubborn" }) do
    it("ends the child when a lost connection interrupts its job, and goes on (" .. mode .. ")",
      function()
        local q = H.queue("spawnlost")
        local rec = H.record_file()
        local pidfile = H.tmpdir() .. "/pid"
        local proxy = H.proxy()
        local proc = H.worker(H.script(pid_script), q, {},
          { [H.RECORD_ENV] = rec, PIDFILE = pidfile, MODE = mode }, proxy.url)
        H.publish(q, 1, { prefix = "l" })
        local pid = wait_pid(pidfile)
        local mark = proc:mark()
        proxy:drop()
        H.wait_until(function() return not alive(pid) end, 3, "child " .. pid .. " to be gone")
        assert.is_true(proc:running(), "warren exited:\n" .. proc:log())
        if mode == "stubborn" then
          proc:wait_log("child " .. pid .. " still runs 1 s after SIGTERM; sending SIGKILL", 1, mark)
        end
        -- Redelivered after the reconnect; this time the job acks without spawning.
        H.wait_until(function() return #H.kinds(rec) == 4 end, 15, "the redelivery")
        assert.same({ "start false", "closed ", "start true", "closed " }, H.kinds(rec))
        H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
        assert.equal(0, H.term(proc))
        proxy:stop()
      end)
  end
end)
