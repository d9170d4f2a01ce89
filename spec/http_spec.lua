-- warren.http: requests from jobs on the loop, against a real local HTTP(S) server
-- (spec/support/httpserver.py) and a real broker.
local H = require "support.helper"
local httpserver = require "support.httpserver"
local tls = require "support.tls"
local cjson = require "cjson"

-- The "case" records by message id: field 2 the id, the rest of the line a JSON object.
local function results(rec)
  local out = {}
  for _, r in ipairs(H.records(rec)) do
    if r[1] == "case" then out[r[2]] = cjson.decode(r.line:match("^case %S+ (.*)$")) end
  end
  return out
end

-- The records of a kind by message id (field 2).
local function by_id(rec, kind)
  local out = {}
  for _, r in ipairs(H.records(rec)) do
    if r[1] == kind then out[r[2]] = r end
  end
  return out
end

-- Open descriptors of a process.
local function fds(pid)
  local p = io.popen("ls /proc/" .. pid .. "/fd")
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

-- A line of /proc/PID/status, in KiB.
local function status_kib(pid, field)
  return tonumber(H.read_file("/proc/" .. pid .. "/status"):match(field .. ":%s*(%d+)"))
end

-- A fresh server, queue, record file and directory for one case.
local function fixture(prefix)
  return httpserver.start(), H.queue(prefix), H.record_file(), H.tmpdir()
end

-- A job script whose handle(body, msg) runs src, with record and now (H.RECORD_LUA) and warren.
local function job(src)
  return H.script(H.RECORD_LUA .. 'local warren = require "warren"; '
    .. "function handle(body, msg) " .. src .. " end")
end

-- Waits until the server saw a client close the connection of a /slow download early.
local function wait_aborted(srv)
  H.wait_until(function() return srv:saw("^aborted /slow") end, 5,
    "the server to see the connection closed")
end

-- One message per case, named by the message's prefix; the job records the case's outcome.
local CASES = H.RECORD_LUA .. [[
  local warren = require "warren"
  local cjson = require "cjson"
  local B, DIR = os.getenv("BASE"), os.getenv("DIR")
  local function echo(res, err)
    if not res then return { err = err } end
    local e = cjson.decode(res.body)
    return { status = res.status, x_echo = res.headers["x-echo"], method = e.method,
      body = e.body, path = e.path, test = e.headers["x-test"], ctype = e.headers["content-type"],
      url = res.url }
  end
  local function raises(opts)
    local ok, err = pcall(warren.http, opts)
    return not ok and tostring(err) or "did not raise"
  end
  local cases = {
    get = function()
      return echo(warren.http { url = B .. "/echo?x=1", headers = { ["X-Test"] = "a b" } })
    end,
    post = function()
      return echo(warren.http { url = B .. "/echo", body = "hello\0\255",
        headers = { ["Content-Type"] = "application/octet-stream" } })
    end,
    put = function()
      return echo(warren.http { method = "PUT", url = B .. "/echo", body = "put body" })
    end,
    put_file = function()
      local f = assert(io.open(DIR .. "/upload", "wb"))
      f:write(string.rep("u", 300000))
      f:close()
      local res, err = warren.http { url = B .. "/files/uploaded", body_file = DIR .. "/upload" }
      return { status = res and res.status, err = err }
    end,
    delete = function() return echo(warren.http { method = "DELETE", url = B .. "/echo" }) end,
    not_found = function()
      local res = assert(warren.http { url = B .. "/nothing" })
      return { status = res.status, body = res.body }
    end,
    redirect = function()
      return echo(warren.http { url = B .. "/redirect?to=/echo%3Fr%3D1", follow = true })
    end,
    no_follow = function()
      local res = assert(warren.http { url = B .. "/redirect?to=/echo" })
      return { status = res.status, location = res.headers.location }
    end,
    max_body = function()
      local res, err = warren.http { url = B .. "/big?size=100000", max_body = 1000 }
      return { res = res ~= nil, err = err }
    end,
    max_body_file = function()
      local res, err = warren.http { url = B .. "/big?size=100000", max_body = 1000,
        output_file = DIR .. "/partial" }
      return { res = res ~= nil, err = err, left = io.open(DIR .. "/partial") ~= nil }
    end,
    refused = function()
      local res, err = warren.http { url = "http://127.0.0.1:" .. os.getenv("FREE_PORT") .. "/" }
      return { res = res ~= nil, err = err }
    end,
    no_file_scheme = function()
      local res, err = warren.http { url = "file:///etc/passwd" }
      return { res = res ~= nil, err = err }
    end,
    bad_args = function()
      return {
        raises(nil), raises({}), raises({ url = 1 }), raises({ url = B, tiemout = 1 }),
        raises({ url = B, timeout = -1 }), raises({ url = B, body = "a", body_file = "b" }),
        raises({ url = B, verify = "no" }), raises({ url = B, method = "get it" }),
        raises({ url = B, headers = { ["X-A"] = "a\r\nX-B: b" } }),
        raises({ url = B, max_body = 0 }),
      }
    end,
    nested = function()
      local co = coroutine.wrap(function() return pcall(warren.http, { url = B .. "/echo" }) end)
      local ok, err = co()
      return { ok = ok, err = tostring(err) }
    end,
    clocks = function()
      local w0, m0 = warren.now(), warren.monotonic()
      warren.sleep(0.05)
      return { wall = math.type(w0), drift = math.abs(w0 - os.time()),
        slept = warren.monotonic() - m0 }
    end,
  }
  function handle(body, msg)
    record("case", msg.message_id, cjson.encode(cases[body]()))
  end]]

describe("warren.http", function()
  after_each(H.stop_all)

  it("makes GET, POST, PUT and other requests with bodies and headers, and reports errors",
    function()
      local srv, q, rec, dir = fixture("http")
      local names = { "get", "post", "put", "put_file", "delete", "not_found", "redirect",
        "no_follow", "max_body", "max_body_file", "refused", "no_file_scheme", "bad_args",
        "nested", "clocks" }
      for _, name in ipairs(names) do H.publish(q, 1, { prefix = name, body = name }) end
      local proc = H.worker(H.script(CASES), q, { "--prefetch", "20" }, { [H.RECORD_ENV] = rec,
        BASE = srv.base, DIR = dir, FREE_PORT = H.free_port() })
      H.wait_until(function() return #H.records(rec) == #names end, 20, "every case")
      local r = results(rec)

      assert.same({ status = 200, x_echo = "yes", method = "GET", body = "", path = "/echo?x=1",
        test = "a b", url = srv.base .. "/echo?x=1" }, r.get1)
      -- The server echoes the body as latin-1 text in JSON, which comes back as UTF-8.
      assert.same({ status = 200, x_echo = "yes", method = "POST", body = "hello\0\195\191",
        path = "/echo", ctype = "application/octet-stream", url = srv.base .. "/echo" }, r.post1)
      assert.equal("PUT", r.put1.method)
      assert.equal("put body", r.put1.body)
      assert.same({ status = 201 }, r.put_file1)
      assert.equal(string.rep("u", 300000), H.read_file(srv.files .. "/uploaded"))
      assert.equal("DELETE", r.delete1.method)
      assert.same({ status = 404, body = "not found\n" }, r.not_found1)
      assert.equal(200, r.redirect1.status)
      assert.equal("/echo?r=1", r.redirect1.path)
      assert.equal(srv.base .. "/echo?r=1", r.redirect1.url)
      assert.same({ status = 302, location = "/echo" }, r.no_follow1)
      assert.same({ res = false, err = "the response body is larger than max_body (1000 bytes)" },
        r.max_body1)
      assert.same({ res = false, left = false,
        err = "the response body is larger than max_body (1000 bytes)" }, r.max_body_file1)
      assert.is_false(r.refused1.res)
      assert.matches("[Cc]onnect", r.refused1.err)
      assert.is_false(r.no_file_scheme1.res)
      assert.matches("file", r.no_file_scheme1.err)
      local bad = r.bad_args1
      assert.equal(10, #bad)
      for i, e in ipairs(bad) do
        assert.matches("warren.http", e, 1, true, "case " .. i)
      end
      assert.matches("unknown option 'tiemout'", bad[4], 1, true)
      assert.matches("timeout must be", bad[5], 1, true)
      assert.matches("do not go together", bad[6], 1, true)
      assert.is_false(r.nested1.ok)
      assert.matches("job's own coroutine", r.nested1.err, 1, true)
      assert.equal("float", r.clocks1.wall)
      assert.is_true(r.clocks1.drift < 5)
      assert.is_true(r.clocks1.slept >= 0.05 and r.clocks1.slept < 2)
      H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
      assert.equal(0, H.term(proc)) -- a clean exit: nothing of libcurl's is left (sanitizers)
    end)

  it("downloads 50 MiB to output_file with warren's memory staying small", function()
    local srv, q, rec, dir = fixture("httpbig")
    local script = job [[
      local path = os.getenv("DIR") .. "/big.bin"
      local res = assert(warren.http { url = os.getenv("BASE") .. "/big?size=52428800",
        output_file = path })
      local f = assert(io.open(res.body, "rb"))
      record("done", msg.message_id, res.status, f:seek("end"), res.body == path)
      f:close()]]
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec, BASE = srv.base, DIR = dir })
    local idle = status_kib(proc.pid, "VmHWM")
    H.publish(q, 1, { prefix = "big" })
    H.wait_until(function() return by_id(rec, "done").big1 end, 60, "the download")
    assert.same({ "200", "52428800", "true" },
      { by_id(rec, "done").big1[3], by_id(rec, "done").big1[4], by_id(rec, "done").big1[5] })
    local hwm = status_kib(proc.pid, "VmHWM")
    print(string.format("warren's peak RSS over a 50 MiB download: %.1f MiB (%.1f MiB before)",
      hwm / 1024, idle / 1024))
    -- The peak grows by libcurl and its buffers (a sanitizer build starts higher), never by
    -- the body.
    assert.is_true(hwm - idle < 12 * 1024, "peak RSS " .. hwm .. " KiB, from " .. idle .. " KiB")
  end)

  it("runs 200 one-second requests from 200 jobs in about the time of one", function()
    local srv, q, rec, dir = fixture("http200")
    local script = job [[
      local t0 = now()
      local res, err = warren.http { url = os.getenv("BASE") .. "/delay?s=1" }
      record("done", msg.message_id, t0, now(), res and res.status or err)]]
    local ids = H.publish(q, 200, { prefix = "c" })
    local t0 = H.now()
    H.worker(script, q, { "--prefetch", "200" }, { [H.RECORD_ENV] = rec, BASE = srv.base })
    H.wait_until(function() return #H.records(rec) == 200 end, 60, "200 requests")
    local done = by_id(rec, "done")
    local first, last = math.huge, 0
    for _, id in ipairs(ids) do
      local r = assert(done[id], "no result for " .. id)
      assert.equal("200", r[5])
      first = math.min(first, tonumber(r[3]))
      last = math.max(last, tonumber(r[4]))
    end
    local span = last - first
    print(string.format("200 concurrent one-second requests: %.2f s (%.2f s from the start)",
      span, H.now() - t0))
    -- One after the other they would take 200 s.
    assert.is_true(span < 10 * H.slow, "200 one-second requests took " .. span .. " s")
  end)

  it("times out a server that never answers while the loop and other jobs go on", function()
    local srv, q, rec, dir = fixture("httphang")
    local script = job [[
      if body == "hang" then
        local t0 = now()
        local res, err = warren.http { url = os.getenv("BASE") .. "/hang", timeout = 4 }
        record("hang", msg.message_id, now() - t0, tostring(res), (err:gsub("%s", "_")), now())
      else
        local stop = now() + 1
        while now() < stop do
          record("tick", msg.message_id, now())
          warren.sleep(0.01)
        end
        record("ticked", msg.message_id, now())
      end]]
    H.worker(script, q, { "--prefetch", "2", "--heartbeat", "1" },
      { [H.RECORD_ENV] = rec, BASE = srv.base })
    H.publish(q, 1, { prefix = "hang", body = "hang" })
    H.wait_until(function() return srv:saw("^request GET /hang") end, 10, "the hanging request")
    H.publish(q, 1, { prefix = "tick", body = "tick" })
    H.wait_until(function() return by_id(rec, "hang").hang1 end, 15, "the timeout")
    local hang = by_id(rec, "hang").hang1
    local took = tonumber(hang[3])
    assert.is_true(took >= 3.9 and took < 4 + 1.5 * H.slow, "the timeout took " .. took .. " s")
    assert.equal("nil", hang[4])
    assert.matches("timed_out", hang[5])
    -- The ticker ran its whole second while the request hung, without a held loop.
    local ticked = assert(by_id(rec, "ticked").tick1, "the ticker did not finish first")
    assert.is_true(tonumber(ticked[3]) < tonumber(hang[6]), "the ticker ended after the timeout")
    local ticks, gap = H.largest_gap(rec)
    assert.is_true(ticks > 20, ticks .. " ticks")
    assert.is_true(gap < 0.25 * H.slow, "the loop was held for " .. gap .. " s")
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
  end)

  it("verifies TLS against the CA given, and fails with a wrong one", function()
    local certs = tls.certs()
    local srv = httpserver.start({ tls = certs })
    local q = H.queue("httptls")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      local cases = {
        good = { ca = os.getenv("CA") },
        wrong = { ca = os.getenv("OTHER_CA") },
        system = {},
        unverified = { verify = false },
      }
      function handle(body, msg)
        local opts = cases[body]
        opts.url = os.getenv("BASE") .. "/echo"
        local res, err = warren.http(opts)
        record("tls", msg.message_id, res and res.status or "nil", err and (err:gsub("%s", "_")))
      end]])
    for _, name in ipairs({ "good", "wrong", "system", "unverified" }) do
      H.publish(q, 1, { prefix = name, body = name })
    end
    H.worker(script, q, { "--prefetch", "4" }, { [H.RECORD_ENV] = rec, BASE = srv.base,
      CA = certs.ca, OTHER_CA = certs.other_ca })
    H.wait_until(function() return #H.records(rec) == 4 end, 15, "four TLS requests")
    local r = by_id(rec, "tls")
    assert.equal("200", r.good1[3])
    assert.equal("200", r.unverified1[3])
    assert.equal("nil", r.wrong1[3])
    assert.matches("certificate", r.wrong1[4])
    assert.equal("nil", r.system1[3])
    assert.matches("certificate", r.system1[4])
  end)

  -- A job that downloads slowly to a file, with a <close> variable.
  local SLOW = H.RECORD_LUA .. [[
    local warren = require "warren"
    function handle(body, msg)
      local guard <close> = setmetatable({}, {
        __close = function() record("closed", msg.message_id) end })
      if body == "warm" then
        assert(warren.http { url = os.getenv("BASE") .. "/echo" })
        record("warm", msg.message_id)
        return
      end
      record("start", msg.message_id, tostring(msg.redelivered))
      if msg.redelivered then return end
      local res, err = warren.http { url = os.getenv("BASE") .. "/slow?size=10000000",
        output_file = os.getenv("DIR") .. "/slow.bin", timeout = 60 }
      record("end", msg.message_id, tostring(res), tostring(err))
    end]]

  it("cancels a transfer in the forced stage and hands the message back", function()
    local srv, q, rec, dir = fixture("httpforce")
    local proc = H.worker(H.script(SLOW), q, {}, { [H.RECORD_ENV] = rec, BASE = srv.base,
      DIR = dir })
    H.publish(q, 1, { prefix = "f" })
    H.wait_until(function() return srv:saw("^request GET /slow") end, 10, "the slow download")
    local took = H.force(proc)
    assert.is_true(took < 1.5, "forced exit took " .. took .. " s")
    assert.is_not_nil(by_id(rec, "closed").f1, "the <close> variable did not run")
    assert.is_nil(by_id(rec, "end").f1, "the job went on after the forced exit")
    assert.is_nil(H.read_file(dir .. "/slow.bin"), "the partial download was left behind")
    wait_aborted(srv)
    H.wait_until(function() return H.depth(q) == 1 end, 10, "the message back in the queue")
    local back = H.drain(q)
    assert.equal("f1", back[1].id)
    assert.is_true(back[1].redelivered)
  end)

  it("cancels a transfer when the job times out, leaving no descriptor open", function()
    local srv, q, rec, dir = fixture("httptimeout")
    local port = H.free_port()
    local proc = H.worker(H.script(SLOW), q,
      { "--job-timeout", "1", "--on-error", "reject", "--metrics", "127.0.0.1:" .. port },
      { [H.RECORD_ENV] = rec, BASE = srv.base, DIR = dir })
    H.publish(q, 1, { prefix = "warm", body = "warm" })
    H.wait_until(function() return by_id(rec, "closed").warm1 end, 10, "the first request")
    local before = fds(proc.pid)
    H.publish(q, 1, { prefix = "t" })
    H.wait_until(function() return by_id(rec, "closed").t1 end, 10, "the job timeout")
    assert.is_nil(by_id(rec, "end").t1, "the job went on after its timeout")
    wait_aborted(srv)
    assert.is_nil(H.read_file(dir .. "/slow.bin"), "the partial download was left behind")
    assert.equal(before, fds(proc.pid))
    local metrics = H.wait_until(function()
      local p = io.popen("exec " .. H.lua_bin .. " -e " .. H.quote(
        "local b = require('socket.http').request('http://127.0.0.1:" .. port .. "/metrics') "
          .. "io.write(b or '')"))
      local text = p:read("a")
      p:close()
      return text ~= "" and text
    end, 10, "the metrics")
    assert.equal(1, H.sample(metrics, 'warren_http_requests_total{result="ok"}'))
    assert.equal(1, H.sample(metrics, 'warren_http_requests_total{result="cancelled"}'))
    assert.equal(0, H.sample(metrics, 'warren_http_requests_total{result="error"}'))
    assert.matches("timed out", proc:log())
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
  end)

  it("lets a transfer finish during the drain", function()
    local srv, q, rec, dir = fixture("httpdrain")
    local script = job [[
      local res, err = warren.http { url = os.getenv("BASE") .. "/delay?s=1" }
      record("end", msg.message_id, res and res.status or err, tostring(warren.draining()))]]
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec, BASE = srv.base })
    H.publish(q, 1, { prefix = "d" })
    H.wait_until(function() return srv:saw("^request GET /delay") end, 10, "the request")
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    local r = assert(by_id(rec, "end").d1, "the job did not finish")
    assert.same({ "200", "true" }, { r[3], r[4] })
    assert.same({}, H.drain(q))
  end)

  it("cancels a transfer when the broker connection is lost, and goes on", function()
    local srv, q, rec, dir = fixture("httplost")
    local proxy = H.proxy()
    local proc = H.worker(H.script(SLOW), q, {}, { [H.RECORD_ENV] = rec, BASE = srv.base,
      DIR = dir }, proxy.url)
    H.publish(q, 1, { prefix = "l" })
    H.wait_until(function() return srv:saw("^request GET /slow") end, 10, "the slow download")
    proxy:drop()
    wait_aborted(srv)
    assert.is_true(proc:running(), "warren exited:\n" .. proc:log())
    -- Redelivered after the reconnect; this time the job returns without a request.
    H.wait_until(function() return #H.kinds(rec) == 4 end, 15, "the redelivery")
    assert.same({ "start false", "closed ", "start true", "closed " }, H.kinds(rec))
    assert.is_nil(H.read_file(dir .. "/slow.bin"), "the partial download was left behind")
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
    proxy:stop()
  end)

  it("makes real requests under warren try, whose timeouts stay real with --virtual-time",
    function()
      local srv = httpserver.start()
      local script = H.script([[
        local warren = require "warren"
        function handle(body)
          local m0 = warren.monotonic()
          warren.sleep(600) -- under the default --job-timeout of 1500 s
          local slept = warren.monotonic() - m0
          local ok = assert(warren.http { url = os.getenv("BASE") .. "/echo" })
          local res, err = warren.http { url = os.getenv("BASE") .. "/hang", timeout = 1 }
          print("result", ok.status, slept >= 600, res, err)
        end]])
      local t0 = H.now()
      local code, out = H.run({ "try", "--virtual-time", script, "x" },
        { env = { BASE = srv.base }, timeout = 20 })
      local took = H.now() - t0
      assert.equal(0, code, out)
      assert.matches("result\t200\ttrue\tnil\tOperation timed out after", out)
      assert.matches("try-1: ack", out, 1, true)
      assert.is_true(took >= 1 and took < 1 + 3 * H.slow, "warren try took " .. took .. " s")
    end)
end)
