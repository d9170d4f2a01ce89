-- The broker password stays secret: it can come from a file or a systemd
-- credential, a password given in argv or WARREN_URL anyway is wiped where
-- ps shows it, and nothing warren writes ever contains it, on any path.
local H = require "support.helper"
local http = require "socket.http"

-- A broker user of our own, with a password no other text contains and
-- characters a URL must escape.
local USER = H.unique_name("secret-user")
local PASSWORD = "Zq7#s3cr:t/" .. string.format("%06x", math.random(0, 0xffffff)) .. "@x%"
local HOSTPORT = assert(H.url:match("^amqp://[^@]*@([^/]+)"), "cannot read " .. H.url)

local function encode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function url(password)
  return "amqp://" .. USER .. ":" .. encode(password) .. "@" .. HOSTPORT .. "/"
end

local function file(text)
  local path = H.tmpdir() .. "/secret"
  H.write_file(path, text)
  return path
end

local function no_secret(text, where)
  assert.is_nil(text:find(PASSWORD, 1, true), "the password is in " .. where .. ":\n" .. text)
  assert.is_nil(text:find(encode(PASSWORD), 1, true), "the encoded password is in " .. where)
end

describe("secrets", function()
  setup(function()
    assert(H.ctl("add_user", USER, PASSWORD))
    assert(H.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*"))
  end)
  teardown(function() H.ctl("delete_user", USER) end)
  after_each(H.stop_all)

  local recorder = H.RECORD_LUA .. [[
    local warren = require "warren"
    function handle(body, msg)
      local r = warren.spawn({ "sh", "-c", "env; tr '\\0' ' ' < /proc/$PPID/cmdline" })
      record("done", msg.message_id)
      io.stderr:write(r and r.stdout or "", "\n")
    end]]

  it("logs in with a password from --password-file, --url-file or the credentials directory",
    function()
    local q = H.queue("secret-file")
    local rec = H.record_file()
    local script = H.script(recorder)
    local plain = "amqp://" .. USER .. "@" .. HOSTPORT .. "/"
    local dir = H.tmpdir()
    H.write_file(dir .. "/url", plain .. "\n")
    H.write_file(dir .. "/password", PASSWORD .. "\n")
    for i, case in ipairs({
      { args = { "--url", plain, "--password-file", file(PASSWORD .. "\n") } },
      { args = { "--url-file", file(url(PASSWORD) .. "\n") } },
      { args = {}, env = { CREDENTIALS_DIRECTORY = dir } },
    }) do
      local args = { "-q", q, "--report", "-", "--log-level", "debug" }
      for _, a in ipairs(case.args) do args[#args + 1] = a end
      local env = { [H.RECORD_ENV] = rec }
      for k, v in pairs(case.env or {}) do env[k] = v end
      local proc = H.start(script, args, { env = env })
      proc:wait_log("consuming '", 10)
      H.publish(q, 1, { prefix = "case" .. i .. "-" })
      H.wait_until(function() return #H.records(rec) == i end, 10, "case " .. i)
      proc:signal("TERM")
      assert.equal(0, proc:wait(10), proc:log())
      no_secret(proc:log(), "the log of case " .. i)
    end
  end)

  it("wipes a password given in argv or WARREN_URL from ps, /proc and spawned programs",
    function()
    local q = H.queue("secret-argv")
    local rec = H.record_file()
    for _, how in ipairs({ "argv", "env" }) do
      local args = { "-q", q, "--log-level", "debug" }
      local env = { [H.RECORD_ENV] = rec }
      if how == "argv" then
        args[#args + 1] = "--url=" .. url(PASSWORD)
      else
        env.WARREN_URL = url(PASSWORD)
      end
      local proc = H.start(H.script(recorder), args, { env = env })
      proc:wait_log("consuming '", 10)
      -- The URL is still there for all to see, with its password wiped.
      local cmdline = H.read_file("/proc/" .. proc.pid .. "/cmdline")
      local environ = H.read_file("/proc/" .. proc.pid .. "/environ")
      local ps = io.popen("ps -ww -o args= -p " .. proc.pid):read("a")
      assert.matches(USER .. ":*", how == "argv" and cmdline or environ, 1, true)
      if how == "argv" then assert.matches(USER .. ":*", ps, 1, true) end
      no_secret(cmdline, "/proc/PID/cmdline (" .. how .. ")")
      no_secret(environ, "/proc/PID/environ (" .. how .. ")")
      no_secret(ps, "ps (" .. how .. ")")
      local before = #H.records(rec)
      H.publish(q, 1, { prefix = how })
      H.wait_until(function() return #H.records(rec) == before + 1 end, 10, "the job")
      proc:signal("TERM")
      assert.equal(0, proc:wait(10), proc:log())
      -- The spawned program printed its environment and warren's command line.
      assert.matches("WARREN_TEST_RECORD=", proc:log(), 1, true)
      no_secret(proc:log(), "the log, with what a spawned program saw (" .. how .. ")")
    end
  end)

  it("never writes the password, whatever fails", function()
    local q, dlq = H.queue("secret-paths", { dead_letter = true })
    local port = H.free_port()
    local report = H.tmpdir() .. "/report"
    local script = H.script([[
      local warren = require "warren"
      function handle(body, msg)
        if body == "fail" then error("failing on purpose") end
        if body == "publish" then
          assert(warren.publish{ exchange = "nosuch", routing_key = "x", body = "b" })
        end
      end]])
    local outputs = {}
    local function run(args, expect)
      local code, out = H.run(args, { timeout = 20 })
      assert.equal(expect, code, out)
      outputs[#outputs + 1] = out
    end
    run({ "--url", url("wrong" .. PASSWORD), "-q", q, "--connect-timeout", 2, script }, 77)
    run({ "--url", "amqp://" .. USER .. ":" .. PASSWORD .. "@" .. HOSTPORT .. "/%zz", "-q", q,
      script }, 64)
    run({ "--url", url(PASSWORD):gsub(HOSTPORT, "127.0.0.1:1"), "-q", q, "--connect-timeout",
      1, script }, 69)
    run({ "--url", url(PASSWORD), "-q", "no-such-queue-here", script }, 69)
    run({ "--url", url(PASSWORD), "--url-file", file(url(PASSWORD)), "-q", q, script }, 64)
    run({ "--url-file", "/nonexistent/url", "-q", q, script }, 64)
    -- A whole run through a job error, a failed publish, retries and the metrics.
    local proc = H.start(script, { "--url", url(PASSWORD), "-q", q, "--max-retries", 0,
      "--log-level", "debug", "--log-format", "json", "--report", report,
      "--metrics", "127.0.0.1:" .. port })
    proc:wait_log("consuming '", 10)
    H.publish(q, 1, { prefix = "fail", body = "fail" })
    H.publish(q, 1, { prefix = "publish", body = "publish" })
    H.publish(q, 1, { prefix = "ok", body = "ok" })
    H.wait_until(function() return H.depth(dlq) == 2 end, 10, "two dead-lettered")
    local metrics = http.request("http://127.0.0.1:" .. port .. "/metrics")
    local health = http.request("http://127.0.0.1:" .. port .. "/healthz")
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
    for i, text in ipairs(outputs) do no_secret(text, "the output of failing run " .. i) end
    no_secret(proc:log(), "the log")
    no_secret(H.read_file(report), "the report")
    no_secret(metrics, "/metrics")
    no_secret(health, "/healthz")
    assert.matches("failing on purpose", proc:log(), 1, true)
  end)
end)
