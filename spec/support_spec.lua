-- Proves the shared spec helpers (spec/support) against the real test broker, so that a
-- failing end-to-end spec can be trusted to point at warren rather than at its tools.
local H = require "support.helper"
local socket = require "socket"

assert(H.url, "WARREN_TEST_URL must name the test broker")

-- AMQP 0-9-1 protocol header; the broker answers with a connection.start method frame.
local AMQP_HEADER = "AMQP\0\0\9\1"

describe("support.helper broker tools", function()
  it("declares, publishes 1000 messages with ids, and drains exactly those", function()
    local q = H.queue("support")
    local ids = H.publish(q, 1000)
    assert.equal(1000, #ids)
    assert.equal("m1", ids[1])
    assert.equal("m1000", ids[1000])

    local ready, consumers = H.depth(q)
    assert.equal(1000, ready)
    assert.equal(0, consumers)

    local got = H.drain(q)
    assert.equal(1000, #got)
    assert.same(ids, H.ids(got))
    for _, m in ipairs(got) do
      assert.is_false(m.redelivered)
      assert.equal(0, m.len)
      assert.equal(0, m.deaths)
    end
    assert.equal(0, (H.depth(q)))
  end)

  it("drains at most opts.max messages and keeps queue order", function()
    local q = H.queue("support-max")
    H.publish(q, 5, { prefix = "a", body = "hello" })
    local got = H.drain(q, { max = 2 })
    assert.same({ "a1", "a2" }, { got[1].id, got[2].id })
    assert.equal(2, #got)
    assert.equal(5, got[1].len)
    assert.equal(3, (H.depth(q)))
  end)

  it("round-trips binary bodies exactly", function()
    local q = H.queue("support-binary")
    local size = 300000 -- more than one AMQP frame
    H.publish(q, 1, { body_size = size })
    assert.equal(H.body_bytes(size), H.get_body(q))

    local every_byte = {}
    for i = 0, 255 do
      every_byte[#every_byte + 1] = string.char(i)
    end
    local binary = table.concat(every_byte) .. "\0tail\0"
    H.publish(q, 1, { body = binary })
    assert.equal(binary, H.get_body(q))

    local path = H.tmpdir() .. "/body.bin"
    H.write_file(path, "\0\1\2 file body\n")
    H.publish(q, 1, { body_file = path })
    assert.equal("\0\1\2 file body\n", H.get_body(q))

    H.publish(q, 1, { body = "" })
    assert.equal("", H.get_body(q))
    assert.is_nil(H.get_body(q))
  end)

  it("declares a dead-letter queue and reports x-death counts", function()
    local q, dlq = H.queue("support-dl", { dead_letter = true })
    assert.equal(q .. ".dlq", dlq)
    H.publish(q, 3, { prefix = "x", expiration = 1, headers = { kind = "test" } })
    H.wait_until(function()
      return H.depth(dlq) == 3
    end, 10, "3 expired messages in the dead-letter queue")
    local got = H.drain(dlq)
    assert.same({ "x1", "x2", "x3" }, H.ids(got))
    for _, m in ipairs(got) do
      assert.equal(1, m.deaths)
    end
  end)

  it("fails loudly when a message is unroutable or a queue is missing", function()
    local missing = H.unique_name("support-missing")
    local ok, err = pcall(H.publish, missing, 2)
    assert.is_false(ok)
    assert.matches("returned", err)
    ok, err = pcall(H.depth, missing)
    assert.is_false(ok)
    assert.matches("NOT_FOUND", err)
  end)

  local with_broker_dir = H.broker_dir and it or pending
  with_broker_dir("runs rabbitmqctl on the test node (H.ctl)", function()
    local q = H.queue("support-ctl")
    H.publish(q, 2)
    local ok, out = H.ctl("list_queues", "name", "messages")
    assert.is_true(ok, out)
    assert.matches(q:gsub("%p", "%%%0") .. "%s+2", out)
    ok, out = H.ctl("no_such_command")
    assert.is_false(ok)
  end)

  it("deletes queues", function()
    local q = H.queue("support-delete")
    H.delete_queue(q)
    assert.is_false(pcall(H.depth, q))
  end)
end)

describe("support.helper utilities", function()
  it("wait_until returns the value and names what it waited for on timeout", function()
    local n = 0
    assert.equal(3, H.wait_until(function()
      n = n + 1
      return n >= 3 and n
    end, 2, "a counter"))
    local ok, err = pcall(H.wait_until, function()
      return false
    end, 0.1, "the moon")
    assert.is_false(ok)
    assert.matches("waiting for the moon", err)
  end)

  it("quotes for the shell and for Lua", function()
    local s = "it's a \"test\" $HOME `x` \\ \n end"
    local p = io.popen("printf '%s' " .. H.quote(s))
    assert.equal(s, p:read("a"))
    p:close()
    local binary = "\0\1\255\n\"'\\"
    assert.equal(binary, load("return " .. H.lua_string(binary))())
  end)

  it("gives fresh temporary directories and script files", function()
    local a, b = H.tmpdir(), H.tmpdir()
    assert.are_not.equal(a, b)
    local path = H.script("return 1", "x.lua")
    assert.matches("/x%.lua$", path)
    assert.equal("return 1", H.read_file(path))
  end)

  it("records lines from a script without shifting its line numbers", function()
    local rec = H.record_file()
    local path = H.script(H.RECORD_LUA .. "record('start', 'm1', now())\nrecord('end', 2, 'x y')\n"
      .. "error('boom')\n")
    local proc = H.spawn({ H.lua_bin, path }, { env = { [H.RECORD_ENV] = rec } })
    assert.equal(1, proc:wait(10))
    assert.matches("job%.lua:3: boom", proc:log())
    local records = H.records(rec)
    assert.equal(2, #records)
    assert.equal("start", records[1][1])
    assert.equal("m1", records[1][2])
    assert.matches("^%d+%.%d%d%d%d%d%d$", records[1][3])
    assert.is_true(math.abs(tonumber(records[1][3]) - H.now()) < 60)
    assert.same({ "end", "2", "x", "y", line = "end 2 x y" }, records[2])
    assert.same({}, H.records(H.record_file()))
  end)
end)

describe("support.helper processes", function()
  local procs = {}
  local function spawn_lua(source, opts)
    local proc = H.spawn({ H.lua_bin, H.script(source) }, opts)
    procs[#procs + 1] = proc
    return proc
  end

  after_each(function()
    for _, proc in ipairs(procs) do
      proc:stop()
    end
    procs = {}
  end)

  it("starts a background process, waits for its log and its exit code", function()
    local proc = spawn_lua([[
      io.stdout:setvbuf("no")
      print("hello " .. os.getenv("GREETING"))
      io.stderr:write("on stderr\n")
      io.read("a") -- stdin is /dev/null: returns at once
      os.exit(3)
    ]], { env = { GREETING = "world" } })
    assert.is_number(proc.pid)
    assert.equal(3, proc:wait(10))
    assert.is_false(proc:running())
    assert.matches("hello world", proc:log())
    assert.matches("on stderr", proc:log())
    assert.equal(3, proc:stop())
  end)

  it("signals a running process and reports death by signal as 128+N", function()
    local proc = spawn_lua([[
      io.stdout:setvbuf("no")
      print("ready")
      local socket = require "socket"
      socket.sleep(30)
    ]])
    assert.is_true(proc:wait_log("ready", 10))
    local mark = proc:mark()
    assert.is_true(proc:running())
    assert.is_nil(proc:wait(0.1))
    local ok, err = pcall(proc.wait_log, proc, "ready", 0.2, mark)
    assert.is_false(ok)
    assert.matches("timed out", err)
    assert.is_true(proc:signal("TERM"))
    assert.equal(128 + 15, proc:wait(10))
    assert.is_false(proc:signal("TERM"))
  end)

  it("stop kills a process that ignores SIGTERM", function()
    local proc = H.spawn({ "sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done" })
    procs[#procs + 1] = proc
    proc:wait_log("up", 10)
    proc:signal("TERM")
    assert.is_nil(proc:wait(0.3))
    assert.equal(128 + 9, proc:stop())
  end)

  it("wait_log fails at once, showing the log, when the process exits", function()
    local proc = spawn_lua("print('last words') os.exit(0)")
    local started = H.now()
    local ok, err = pcall(proc.wait_log, proc, "never printed", 10)
    assert.is_false(ok)
    assert.matches("exited with code 0", err)
    assert.matches("last words", err)
    assert.is_true(H.now() - started < 5)
  end)
end)

describe("support.helper tcp proxy", function()
  local proxy, q

  before_each(function()
    q = H.queue("support-proxy")
    proxy = H.proxy()
  end)

  after_each(function()
    proxy:stop()
  end)

  local function depth_via_proxy(timeout)
    return H.wtool({ "--url", proxy.url, "--timeout", timeout or 10, "depth", q })
  end

  -- A raw client connection through the proxy: sends the AMQP header, returns the socket.
  local function raw_client()
    local c = assert(socket.connect("127.0.0.1", proxy.port))
    assert(c:send(AMQP_HEADER))
    return c
  end

  it("forwards an AMQP connection with the same credentials", function()
    assert.matches("^amqp://guest:guest@127%.0%.0%.1:" .. proxy.port .. "/?$", proxy.url)
    H.publish(q, 7)
    local code, out, err = depth_via_proxy()
    assert.equal(0, code, err)
    assert.equal("7 0\n", out)
  end)

  it("holds connections as a black hole, then passes again", function()
    local c = raw_client()
    c:settimeout(5)
    assert.equal("\1", c:receive(1)) -- connection.start is a method frame (type 1)
    proxy:hold()
    local code, _, err = depth_via_proxy(1)
    assert.equal(1, code)
    assert.matches("timed out", err)

    local c2 = raw_client()
    c2:settimeout(0.3)
    local data, why = c2:receive(1)
    assert.is_nil(data)
    assert.equal("timeout", why)
    proxy:pass()
    c2:settimeout(5)
    assert.equal("\1", c2:receive(1))
    c:close()
    c2:close()
    assert.equal(0, (depth_via_proxy()))
  end)

  it("drops current connections and accepts new ones", function()
    local c = raw_client()
    c:settimeout(5)
    assert.equal("\1", c:receive(1))
    proxy:drop()
    -- "*a" reads until the peer closes (why nil), or gives up with "timeout"
    local _, why = c:receive("*a")
    assert.are_not.equal("timeout", why)
    c:close()
    assert.equal(0, (depth_via_proxy()))
  end)

  it("refuses connections until passed", function()
    proxy:refuse()
    local code, _, err = depth_via_proxy()
    assert.equal(1, code)
    assert.matches("cannot connect", err)
    proxy:pass()
    assert.equal(0, (depth_via_proxy()))
  end)

  it("exits when stopped or when its control file disappears", function()
    proxy:stop()
    assert.is_false(proxy.proc:running())
    local other = H.proxy()
    os.remove(other.control)
    assert.is_number(other.proc:wait(5))
  end)
end)

describe("support.helper with warren", function()
  local run_it = H.warren_bin and it or pending
  local procs = {}

  after_each(function()
    for _, proc in ipairs(procs) do
      proc:stop()
    end
    procs = {}
  end)

  run_it("runs warren synchronously (H.run)", function()
    local code, out = H.run({ "--version" })
    assert.equal(0, code, out)
    local good = H.script("function handle(body, msg) end\n")
    code, out = H.run({ "check", good })
    assert.equal(0, code, out)
    local bad = H.script("function handle(body, msg)\n")
    code, out = H.run({ "check", bad })
    assert.equal(78, code, out)
    code = H.run({ "--no-such-option" }, { split = true })
    assert.equal(64, code)
  end)

  run_it("starts a worker that consumes, records and drains on SIGTERM (H.start)", function()
    local q = H.queue("support-warren")
    local ids = H.publish(q, 5)
    local rec = H.record_file()
    local path = H.script(H.RECORD_LUA .. [[
function handle(body, msg)
  record("done", msg.message_id, now())
end
]])
    local proc = H.start(path, { "--url", H.url, "--queue", q }, { env = { [H.RECORD_ENV] = rec } })
    procs[#procs + 1] = proc
    H.wait_until(function()
      return #H.records(rec) == 5
    end, 20, "5 messages handled")
    assert.same(ids, H.ids(H.records(rec)))
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
    assert.equal(0, (H.depth(q)))
  end)
end)
