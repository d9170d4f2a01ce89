-- `warren check`, `warren try`, `--help` and `--version`: the script without
-- a broker. Outputs and exit codes, as a user at a terminal sees them.
local H = require "support.helper"

-- A Lua pattern matching s literally.
local function literal(s)
  return (s:gsub("%p", "%%%0"))
end

local function lines(text)
  local list = {}
  for l in text:gmatch("[^\n]+") do list[#list + 1] = l end
  return list
end

local SYNTAX_ERROR = "function handle(body)\n  return body +\nend\n"

describe("warren check", function()
  it("prints SCRIPT: ok and exits 0 for a good script", function()
    local path = H.script("function handle(body, msg) end\n")
    local code, out, err = H.run({ "check", path }, { split = true })
    assert.equal(0, code)
    assert.equal(path .. ": ok\n", out)
    assert.equal("", err)
  end)

  it("accepts a handle returned in a table", function()
    local path = H.script("return { handle = function(body, msg) end }\n")
    local code, out = H.run({ "check", path }, { split = true })
    assert.equal(0, code)
    assert.equal(path .. ": ok\n", out)
  end)

  it("exits 78 for a script that cannot load under --memory-limit, and loads it without", function()
    local path = H.script("local big = {}\nfor i = 1, 1e6 do big[i] = i .. '' end\n"
      .. "function handle() end\n")
    local code, out, err = H.run({ "--memory-limit", "4", "check", path }, { split = true })
    assert.equal(78, code)
    assert.equal("", out)
    assert.equal(path .. ": not enough memory to load it under the memory limit of 4 MB\n", err)
    code, out = H.run({ "check", path }, { split = true })
    assert.equal(0, code)
    assert.equal(path .. ": ok\n", out)
  end)

  it("only loads: a handler that throws passes", function()
    local path = H.script("function handle(body, msg) error('boom') end\n")
    local code, out, err = H.run({ "check", path }, { split = true })
    assert.equal(0, code)
    assert.equal(path .. ": ok\n", out)
    assert.equal("", err)
  end)

  for _, case in ipairs({
    { "a syntax error", SYNTAX_ERROR, ":3: unexpected symbol near 'end'" },
    { "an error while loading", "local x = 1\nerror('not today')\n", ":2: not today" },
    { "an error object that is not a string", "local x = 1\nerror({})\n",
      ":2: %(error object is a table value%)" },
    { "a missing handle", "local x = 1\n",
      ": no handle%(body, msg%) function, nor a table of them by queue name %(define a global "
      .. "handle or return a table with one%)" },
    { "warren.sleep at load time", "require('warren').sleep(1)\nfunction handle() end\n",
      ":1: warren.sleep can only be called from a job's own coroutine" },
  }) do
    it("exits 78 with file:line on " .. case[1], function()
      local path = H.script(case[2])
      local code, out, err = H.run({ "check", path }, { split = true })
      assert.equal(78, code)
      assert.equal("", out)
      assert.equal(1, #lines(err), err)
      assert.matches("^" .. literal(path) .. case[3], err)
    end)
  end

  it("reports a module from the script's directory that does not compile with its file:line",
    function()
    local path = H.script('local helper = require "helper"\nfunction handle() end\n')
    local helper = path:match("^(.*)/") .. "/helper.lua"
    H.write_file(helper, "local M = {}\nM.x = = 1\nreturn M\n")
    local code, out, err = H.run({ "check", path }, { split = true })
    assert.equal(78, code)
    assert.equal("", out)
    assert.equal(1, #lines(err), err)
    assert.matches(literal(helper) .. ":2: unexpected symbol near '='", err)
  end)

  it("stops a top level that never ends after 5 s, at its line", function()
    local path = H.script("local n = 0\nwhile true do\n  n = n + 1\nend\nfunction handle() end\n")
    local t0 = H.now()
    local code, _, err = H.run({ "check", path }, { split = true, timeout = 20 })
    local took = H.now() - t0
    assert.equal(78, code)
    assert.matches("^" .. literal(path) .. ":[23]: still loading after 5 s", err)
    assert.is_true(took >= 5 and took < 8, "took " .. took .. " s")
  end)

  it("lets the script log while it loads", function()
    local path = H.script('local warren = require "warren"\n'
      .. 'warren.log.info("loading version", warren.version)\nfunction handle() end\n')
    local code, out, err = H.run({ "check", path }, { split = true })
    assert.equal(0, code)
    assert.equal(path .. ": ok\n", out)
    assert.matches("^%S+ info  loading version 1\n$", err)
  end)

  it("exits 78 when the script cannot be read, and 64 without a script", function()
    local code, out, err = H.run({ "check", "/nonexistent/job.lua" }, { split = true })
    assert.equal(78, code)
    assert.equal("", out)
    assert.matches("cannot open /nonexistent/job.lua", err, 1, true)
    code, out, err = H.run({ "check" }, { split = true })
    assert.equal(64, code)
    assert.equal("", out)
    assert.equal("warren: missing SCRIPT.lua (see warren --help)\n", err)
  end)

  it("gives up on an unreachable broker when --connect-timeout says, not later", function()
    local t0 = H.now()
    local code, out = H.run({ "--url", "amqp://guest:guest@127.0.0.1:1/", "--queue", "x",
      "--connect-timeout", "1", H.script("function handle() end") })
    local took = H.now() - t0
    assert.equal(69, code, out)
    assert.matches("gave up after 1.0 s", out, 1, true)
    assert.is_true(took >= 1 and took < 2.5, "took " .. took .. " s")
  end)

  it("refuses a queue given twice", function()
    local code, out = H.run({ "-q", "a", "-q", "b,a:3", H.script("function handle() end") })
    assert.equal(64, code)
    assert.equal("warren: --queue: queue 'a' given twice\n", out)
  end)

  it("names the queue a table of handlers has no handler for, before connecting", function()
    local path = H.script("handle = { img = function() end, mail = 'not a function' }")
    for _, args in ipairs({ { "check", "-q", "img,mail", path },
      { "--url", "amqp://guest:guest@127.0.0.1:1/", "-q", "img", "-q", "mail", path } }) do
      local code, out = H.run(args)
      assert.equal(78, code, out)
      assert.matches("no handler for queue 'mail'", out, 1, true)
      assert.equal(1, #lines(out), out)
    end
    local code, out = H.run({ "check", "-q", "img", path })
    assert.equal(0, code, out)
  end)

  it("reports an unreadable script like any usage error, in every command", function()
    for _, args in ipairs({ { "-q", "dots", "nosuch.lua" }, { "check", "nosuch.lua" },
      { "try", "nosuch.lua", "x" } }) do
      local code, out, err = H.run(args, { split = true })
      assert.equal(78, code)
      assert.equal("", out)
      assert.equal("warren: cannot open nosuch.lua: No such file or directory\n", err)
    end
  end)

  it("reports a module that is not found with every path searched, cut at no byte", function()
    local path = H.script('require "no.such.module"\nfunction handle() end\n')
    local code, _, err = H.run({ "check", path }, { split = true })
    assert.equal(78, code)
    assert.equal(1, #lines(err), err)
    assert.is_true(#err > 600, #err .. " bytes")
    -- Every searcher's list is there, to the last path.
    assert.matches("module 'no.such.module' not found:", err, 1, true)
    assert.matches("no file '[^']+/loadall%.so' no file '%./no%.so'\n$", err)
  end)
end)

describe("warren try", function()
  -- Records each body (hex, so that empty and odd bodies show) and msg fields.
  local recorder = H.RECORD_LUA .. [[local warren = require "warren"
function handle(body, msg)
  warren.log.info("got", body)
  record(msg.message_id, (body:gsub(".", function(c) return string.format("%02x", c:byte()) end)),
    msg.routing_key, tostring(msg.redelivered), msg.delivery_tag)
end
]]

  local function hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
  end

  it("runs handle on each body from argv, in order, and prints ack for each", function()
    local rec = H.record_file()
    local path = H.script(recorder)
    local bodies = { "a b", "", "ünï", "last" }
    local args = { "try", path }
    for _, b in ipairs(bodies) do args[#args + 1] = b end
    local code, out, err = H.run(args, { split = true, env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, code, err)
    assert.equal("try-1: ack\ntry-2: ack\ntry-3: ack\ntry-4: ack\n", out)
    local got = {}
    for i, r in ipairs(H.records(rec)) do
      got[i] = r.line
    end
    assert.same({
      "try-1 " .. hex("a b") .. " try false 1",
      "try-2  try false 2",
      "try-3 " .. hex("ünï") .. " try false 3",
      "try-4 " .. hex("last") .. " try false 4",
    }, got)
    assert.matches("info  %[try%-1%] got a b\n", err)
  end)

  it("reads one body per stdin line when there is none on the command line", function()
    local rec = H.record_file()
    local path = H.script(recorder)
    local code, out = H.run({ "try", path },
      { split = true, stdin = "one\n\nthree", env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, code)
    assert.equal("try-1: ack\ntry-2: ack\ntry-3: ack\n", out)
    local got = {}
    for i, r in ipairs(H.records(rec)) do got[i] = r.line end
    assert.same({
      "try-1 " .. hex("one") .. " try false 1",
      "try-2  try false 2",
      "try-3 " .. hex("three") .. " try false 3",
    }, got)
  end)

  it("prints retry for a handler that throws, with the error, its traceback and the decision",
    function()
    local path = H.script([[local function inner(body)
  error("bad body " .. body)
end
function handle(body, msg)
  if body:find("x") then inner(body) end
end
]])
    local code, out, err = H.run({ "try", path, "fine", "x1", "also fine" }, { split = true })
    assert.equal(1, code)
    assert.equal("try-1: ack\ntry-2: retry\ntry-3: ack\n", out)
    local p = literal(path)
    -- One record, the traceback escaped onto its line.
    assert.matches("error job try%-2 %(tag 2%) failed: " .. p .. ":2: bad body x1\\n"
      .. "stack traceback:\\n", err)
    assert.matches("warn  job try-2 (tag 2) failed: retry in 1 s as attempt 1 of 5\n", err, 1, true)
    assert.matches("\\n\\t" .. p .. ":2: in upvalue 'inner'\\n", err)
    assert.matches("\\n\\t" .. p .. ":5: in function 'handle'", err)
    assert.equal(2, select(2, err:gsub("\n", "")), err)
    assert.is_nil(err:find("fine", 1, true))
  end)

  it("prints the outcome the script chose: reject, requeue, ack", function()
    local path = H.script([[local warren = require "warren"
function handle(body)
  if body == "reject" then return warren.reject() end
  if body == "requeue" then return warren.requeue() end
end
]])
    local code, out = H.run({ "try", path, "reject", "requeue", "ok" }, { split = true })
    assert.equal(1, code)
    assert.equal("try-1: reject\ntry-2: requeue\ntry-3: ack\n", out)
  end)

  it("shows what the failure policy does with a failing or timed-out body", function()
    local path = H.script([[local warren = require "warren"
function handle(body)
  if body == "fail" then error("no") end
  if body == "slow" then warren.sleep(10) end
  if body == "hog" then local t = {} for i = 1, 1e8 do t[i] = ("x"):rep(64) .. i end end
end
]])
    local cases = {
      { {}, "retry", "failed: retry in 1 s as attempt 1 of 5" },
      { { "--max-retries", "3", "--on-error", "retry" }, "retry",
        "failed: retry in 1 s as attempt 1 of 3" },
      { { "--max-retries", "0" }, "reject", "failed: reject, 0 of 0 retries used" },
      { { "--on-error", "requeue" }, "requeue", "failed: requeue at once (--on-error requeue)" },
      { { "--on-error", "reject" }, "reject", "failed: reject (--on-error reject)" },
    }
    for _, case in ipairs(cases) do
      local args = { "try", path, "fail", "ok" }
      for i, a in ipairs(case[1]) do table.insert(args, i, a) end
      local code, out, err = H.run(args, { split = true })
      assert.equal(1, code)
      assert.equal("try-1: " .. case[2] .. "\ntry-2: ack\n", out)
      assert.matches("job try-1 (tag 1) " .. case[3] .. "\n", err, 1, true)
    end
    local t0 = H.now()
    local code, out, err = H.run({ "--job-timeout", "0.5", "try", path, "slow" }, { split = true })
    assert.equal(1, code)
    assert.equal("try-1: retry\n", out)
    assert.is_true(H.now() - t0 < 3, "the timeout took " .. (H.now() - t0) .. " s")
    assert.matches("error job try-1 (tag 1) timed out: ran longer than 0.5 s (--job-timeout)\n",
      err, 1, true)
    assert.matches("job try-1 (tag 1) timed out: retry in 1 s as attempt 1 of 5\n", err, 1, true)
    code, out, err = H.run({ "--memory-limit", "16", "try", path, "hog", "ok" }, { split = true })
    assert.equal(1, code)
    assert.equal("try-1: retry\ntry-2: ack\n", out)
    assert.matches("job try-1 (tag 1) ran out of memory: retry in 1 s as attempt 1 of 5\n", err,
      1, true)
  end)

  it("sleeps for real, one body after another", function()
    local rec = H.record_file()
    local path = H.script(H.RECORD_LUA .. [[local warren = require "warren"
function handle(body, msg)
  record("start", msg.message_id, now())
  warren.sleep(tonumber(body))
  record("end", msg.message_id, now())
end
]])
    local code, out = H.run({ "try", path, "0.3", "0.3" },
      { split = true, env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, code)
    assert.equal("try-1: ack\ntry-2: ack\n", out)
    local r = H.records(rec)
    assert.same({ "start", "try-1", "end", "try-1", "start", "try-2", "end", "try-2" },
      { r[1][1], r[1][2], r[2][1], r[2][2], r[3][1], r[3][2], r[4][1], r[4][2] })
    for _, i in ipairs({ 1, 3 }) do
      local slept = tonumber(r[i + 1][3]) - tonumber(r[i][3])
      assert.is_true(slept >= 0.29 and slept < 1, "slept " .. slept .. " s")
    end
  end)

  for _, case in ipairs({
    { "a syntax error", SYNTAX_ERROR, ":3: unexpected symbol near 'end'" },
    { "a missing handle", "local x = 1\n", ": no handle%(body, msg%) function" },
  }) do
    it("exits 78 with file:line on " .. case[1] .. ", running nothing", function()
      local path = H.script(case[2])
      local code, out, err = H.run({ "try", path, "a" }, { split = true })
      assert.equal(78, code)
      assert.equal("", out)
      assert.matches("^" .. literal(path) .. case[3], err)
    end)
  end

  it("interrupts the running job on SIGTERM: <close> runs, its child ends, exit 75", function()
    local rec = H.record_file()
    local path = H.script(H.RECORD_LUA .. [[local warren = require "warren"
function handle(body, msg)
  local guard <close> = setmetatable({}, { __close = function() record("closed", msg.message_id) end })
  record("start", msg.message_id)
  warren.spawn { "sh", "-c", "echo $$ > " .. os.getenv("PIDFILE") .. "; exec sleep 30" }
end
]])
    local pidfile = H.tmpdir() .. "/pid"
    local proc = H.start(nil, { "try", path, "first", "second" },
      { env = { [H.RECORD_ENV] = rec, PIDFILE = pidfile } })
    local pid = H.wait_until(function()
      local text = H.read_file(pidfile)
      return text and text:match("%d+")
    end, 10, "the child's pid")
    proc:signal("TERM")
    assert.equal(75, proc:wait(5))
    assert.matches("try-1: interrupted", proc:log(), 1, true)
    assert.is_nil(proc:log():find("try-2", 1, true))
    local r = H.records(rec)
    assert.same({ "start", "closed" }, { r[1][1], r[2][1] })
    H.wait_until(function() return not os.execute("kill -0 " .. pid .. " 2>/dev/null") end, 5,
      "the child gone")
  end)
end)

describe("warren --help and --version", function()
  it("prints the usage with every command on stdout and exits 0", function()
    for _, flag in ipairs({ "--help", "-h" }) do
      local code, out, err = H.run({ flag }, { split = true })
      assert.equal(0, code)
      assert.equal("", err)
      assert.matches("warren %[OPTIONS%] SCRIPT%.lua", out)
      assert.matches("warren check SCRIPT%.lua", out)
      assert.matches("warren try SCRIPT%.lua %[BODY%.%.%]", out)
      assert.matches("--no-watch", out, 1, true)
      for _, option in ipairs({ "--on-error POLICY", "--job-timeout SECS", "--memory-limit MB" }) do
        assert.matches(option, out, 1, true)
      end
    end
  end)

  it("lists every exit code of the contract with its meaning", function()
    local contract = assert(H.read_file(H.source_dir .. "/docs/contract.md"))
    local table_text = assert(contract:match("\n## Exit codes\n(.-)\n\n"), "no exit code table")
    local codes = {}
    for code in table_text:gmatch("\n| (%d+) |") do codes[#codes + 1] = code end
    assert.same({ "0", "64", "69", "75", "76", "77", "78" }, codes)
    local _, out = H.run({ "--help" }, { split = true })
    for _, code in ipairs(codes) do
      assert.matches("\n  " .. code .. " +%a", out)
    end
    assert.matches("76  TLS: the broker's certificate is not trusted", out, 1, true)
    assert.matches("77  the broker refused the credentials, the client certificate or the vhost",
      out, 1, true)
    assert.matches("78  the script does not load or has no handle", out, 1, true)
    assert.matches("warren try exits 0 when every body was acked, 1 otherwise, 75 when interrupted",
      out, 1, true)
  end)

  it("prints the project's version and exits 0", function()
    local cmake = assert(H.read_file(H.source_dir .. "/CMakeLists.txt"))
    local version = assert(cmake:match("project%(warren VERSION ([%d%.]+)"))
    for _, flag in ipairs({ "--version", "-V" }) do
      local code, out, err = H.run({ flag }, { split = true })
      assert.equal(0, code)
      assert.equal("", err)
      assert.equal("warren " .. version .. "\n", out)
    end
  end)
end)

describe("warren try on a terminal", function()
  it("says it reads bodies from standard input when given none", function()
    local script = H.script("function handle() end\n")
    local out = H.tmpdir() .. "/out"
    -- script(1) gives warren a terminal; timeout ends the wait for a body.
    os.execute("timeout 3 script -qec " .. H.quote(H.quote(H.warren_bin) .. " try "
      .. H.quote(script)) .. " /dev/null </dev/null >" .. H.quote(out) .. " 2>&1")
    assert.matches("warren try: reading bodies from standard input, one per line; Ctrl-D ends",
      H.read_file(out) or "", 1, true)
  end)
end)

describe("warren try, publishing and retrying", function()
  it("prints what a job would publish as JSON lines, and honours --max-retries", function()
    local cjson = require "cjson"
    local path = H.script([[
      local warren = require "warren"
      function handle(body, msg)
        warren.publish{ routing_key = "out", body = body .. "\n\0!", message_id = "m-" .. body }
        if body == "later" then warren.retry(5) end
      end]])
    local code, out, err = H.run({ "try", "--max-retries", "2", path, "now", "later" },
      { split = true })
    assert.equal(0, code, err)
    local got = lines(out)
    assert.equal(4, #got, out)
    local first = cjson.decode(got[1]).publish
    assert.same({ exchange = "", routing_key = "out", message_id = "m-now", persistent = true,
      body = "now\n\0!" }, first)
    assert.equal("try-1: ack", got[2])
    assert.equal("m-later", cjson.decode(got[3]).publish.message_id)
    -- The original is acked once its copy is out, as in the worker.
    assert.equal("try-2: ack", got[4])
    assert.matches("try: retry 1 of 2 in 5 s", err, 1, true)
    code, out = H.run({ "try", "--max-retries", "0", path, "later" }, { split = true })
    assert.equal(1, code)
    assert.matches("try%-1: reject\n$", out)
  end)
end)

describe("warren try --virtual-time", function()
  local HOUR = H.script([[
    local warren = require "warren"
    function handle(body, msg)
      warren.sleep(3600)
      warren.log.info("slept an hour")
    end]])

  it("tries a script that sleeps an hour in under a second", function()
    local t0 = H.now()
    local code, out, err = H.run({ "try", "--virtual-time", "--job-timeout", "0", HOUR, "a", "b" },
      { split = true })
    assert.equal(0, code, err)
    assert.equal("try-1: ack\ntry-2: ack\n", out)
    assert.equal(2, select(2, err:gsub("slept an hour", "")))
    assert.is_true(H.now() - t0 < 1, "took " .. (H.now() - t0) .. " s")
  end)

  it("counts --job-timeout on the virtual clock", function()
    local code, out, err = H.run({ "try", "--virtual-time", HOUR, "a" }, { split = true })
    assert.equal(1, code)
    assert.equal("try-1: retry\n", out)
    assert.matches("job try-1 (tag 1) timed out: ran longer than 1500 s (--job-timeout)", err, 1,
      true)
    assert.is_nil(err:find("slept an hour", 1, true))
  end)

  it("is refused outside try", function()
    local code, out = H.run({ "--queue", "x", "--virtual-time", HOUR })
    assert.equal(64, code)
    assert.equal("warren: --virtual-time only applies to warren try\n", out)
  end)
end)

describe("warren try with fixtures", function()
  it("delivers each fixture as a broker would, with headers, properties and reply_to", function()
    local cjson = require "cjson"
    local dir = H.tmpdir()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        warren.sleep(3600)
        record("msg", msg.message_id, #body, msg.routing_key, msg.exchange == "" and "-" or msg.exchange,
          tostring(msg.redelivered), msg.headers.kind or "-",
          msg.headers.nested and msg.headers.nested[2] or "-", msg.content_type or "-")
        if msg.reply_to then warren.reply(msg, "re: " .. body) end
      end]])
    H.write_file(dir .. "/one.json", cjson.encode({
      body = "hello", routing_key = "rk", exchange = "ex", redelivered = true,
      headers = { kind = "thumb", nested = { 1, "two" } },
      properties = { reply_to = "answers", correlation_id = "c-9", content_type = "text/plain" },
    }))
    H.write_file(dir .. "/many.jsonl", '{"body_base64": "AAEC/w=="}\n\n{"message_id": "given"}\n')
    local rec = H.record_file()
    local t0 = H.now()
    local code, out, err = H.run({ "try", "--virtual-time", "--job-timeout", "0", "--message",
      dir .. "/one.json", script }, { split = true, env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, code, err)
    local got = lines(out)
    local reply = cjson.decode(got[1]).reply
    assert.same({ "answers", "re: hello" }, { reply.routing_key, reply.body })
    assert.equal("try-1: ack", got[2])
    assert.same({ "msg", "try-1", "5", "rk", "ex", "true", "thumb", "two", "text/plain" },
      { table.unpack(H.records(rec)[1], 1, 9) })
    code, out, err = H.run({ "try", "--virtual-time", "--job-timeout", "0", "--messages",
      dir .. "/many.jsonl", script }, { split = true, env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, code, err)
    assert.equal("try-1: ack\ntry-2: ack\n", out)
    local r = H.records(rec)
    assert.same({ "msg", "try-1", "4", "try", "-", "false" }, { table.unpack(r[2], 1, 6) })
    assert.same({ "msg", "given", "0" }, { table.unpack(r[3], 1, 3) })
    -- Three hours of sleep in all.
    assert.is_true(H.now() - t0 < 2, "took " .. (H.now() - t0) .. " s")
  end)

  it("refuses fixtures it cannot read, with exit 64", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/bad.json", "{bad")
    local script = H.script("function handle() end")
    local code, _, err = H.run({ "try", "--message", dir .. "/bad.json", script },
      { split = true })
    assert.equal(64, code)
    assert.matches("^warren try: " .. literal(dir) .. "/bad%.json: Expected object key", err)
    code, _, err = H.run({ "try", "--message", dir .. "/bad.json", script, "body" },
      { split = true })
    assert.equal(64, code)
    assert.equal("warren: give bodies or --message/--messages, not both\n", err)
  end)
end)
