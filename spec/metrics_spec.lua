-- The metrics and health server: counters scraped during a run match the
-- jobs done by outcome, /healthz follows the worker's state, and clients
-- that dawdle hold nothing up.
local H = require "support.helper"
local socket = require "socket"
local http = require "socket.http"
local free_port, sample = H.free_port, H.sample

-- The status code and body, or nil and why.
local function get(port, path)
  local body, code = http.request("http://127.0.0.1:" .. port .. path)
  if not body then return nil, code end
  return code, body
end

describe("metrics", function()
  after_each(H.stop_all)

  it("counts jobs by outcome, errors, deliveries, publishes and spawns as they happen", function()
    local q, dlq = H.queue("metrics", { dead_letter = true })
    local target = H.queue("metrics-target")
    local port = free_port()
    local script = H.script([[
      local warren = require "warren"
      function handle(body, msg)
        if body == "reject" then warren.reject()
        elseif body == "requeue" and not msg.redelivered then warren.requeue()
        elseif body == "fail" then error("boom")
        elseif body == "publish" then warren.publish{ routing_key = os.getenv("TARGET"), body = "x" }
        elseif body == "spawn" then
          warren.spawn{ "true" }
          warren.spawn{ "false" }
          warren.spawn{ "/nonexistent/program" }
        end
      end]])
    local proc = H.worker(script, q, { "--metrics", "127.0.0.1:" .. port, "--max-retries", 1 },
      { TARGET = target })
    for _, body in ipairs({ "ok", "ok", "ok", "reject", "reject", "requeue", "fail", "publish",
      "spawn" }) do
      H.publish(q, 1, { prefix = body, body = body })
    end
    -- fail: retried once through the delay queue (1 s), then rejected.
    H.wait_until(function() return H.depth(dlq) == 3 end, 15, "two rejects and the failed one")
    local q_label = 'queue="' .. q .. '"'
    local text
    H.wait_until(function()
      local code, body = get(port, "/metrics")
      text = body
      return code == 200 and sample(text, "warren_jobs_total{" .. q_label .. ',outcome="reject"}') == 3
    end, 10, "the counters")
    local function jobs(outcome)
      return sample(text, "warren_jobs_total{" .. q_label .. ',outcome="' .. outcome .. '"}')
    end
    -- ok x3, publish, spawn and the requeued one on its second run.
    assert.equal(6, jobs("ack"))
    assert.equal(1, jobs("requeue"))
    assert.equal(3, jobs("reject"))
    assert.equal(1, jobs("retry"))
    assert.equal(0, jobs("interrupted"))
    assert.equal(2, sample(text, "warren_job_errors_total{" .. q_label .. "}"))
    assert.equal(11, sample(text, "warren_job_duration_seconds_count{" .. q_label .. "}"))
    assert.equal(11, sample(text, "warren_job_duration_seconds_bucket{" .. q_label .. ',le="+Inf"}'))
    assert.equal(10, sample(text, "warren_deliveries_total{" .. q_label .. ',redelivered="false"}'))
    assert.equal(1, sample(text, "warren_deliveries_total{" .. q_label .. ',redelivered="true"}'))
    assert.equal(0, sample(text, "warren_jobs_in_flight{" .. q_label .. "}"))
    -- The failure policy's retry copy is not a script's publish.
    assert.equal(1, sample(text, 'warren_publishes_total{result="ok"}'))
    assert.equal(1, sample(text, 'warren_spawns_total{result="ok"}'))
    assert.equal(1, sample(text, 'warren_spawns_total{result="failed"}'))
    assert.equal(1, sample(text, 'warren_spawns_total{result="error"}'))
    assert.equal(1, sample(text, "warren_connected"))
    assert.equal(1, sample(text, "warren_script_version"))
    assert.is_true(sample(text, "warren_loop_lag_seconds_count") > 0)
    assert.is_true(sample(text, "process_resident_memory_bytes") > 1e6)
    assert.is_true(sample(text, "process_open_fds") > 3)
    assert.is_true(math.abs(sample(text, "process_start_time_seconds") - os.time()) < 60)
    -- Every line is a comment or a sample; every family has HELP and TYPE.
    for line in text:gmatch("[^\n]+") do
      assert.is_truthy(line:match("^# [HT][EY][LP]") or line:match("^[%a_]+{?.-}? %S+$"), line)
    end
    assert.equal(0, sample(text, "warren_quiet"))
    proc:signal("USR1")
    H.wait_until(function() return sample(select(2, get(port, "/metrics")), "warren_quiet") == 1 end,
      5, "quiet in the metrics")
    local _, health = get(port, "/healthz")
    assert.matches('"state":"quiet"', health, 1, true)
    proc:signal("USR2")
    H.wait_until(function() return sample(select(2, get(port, "/metrics")), "warren_quiet") == 0 end,
      5, "consuming again in the metrics")
    proc:signal("HUP")
    H.wait_until(function()
      local _, body = get(port, "/metrics")
      return sample(body, 'warren_reloads_total{result="ok"}') == 1
        and sample(body, "warren_script_version") == 2
    end, 10, "the reload counted")
    assert.equal(0, H.term(proc))
    assert.equal(1, H.depth(target))
  end)

  it("answers /healthz by state: connecting, consuming, draining, disconnected", function()
    local q = H.queue("health")
    local rec = H.record_file()
    local port = free_port()
    local proxy = H.proxy()
    proxy:refuse()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg) record("start", msg.message_id); warren.sleep(tonumber(body)) end]])
    local proc = H.start(script, { "--url", proxy.url, "--queue", q, "--metrics", port,
      "--connect-timeout", 0, "--drain-timeout", 10, "--heartbeat", 1 }, { env = { [H.RECORD_ENV] = rec } })
    H.wait_until(function() return get(port, "/healthz") end, 10, "the health server")
    local code, body = get(port, "/healthz")
    assert.equal(503, code)
    assert.matches('"state":"connecting"', body)
    assert.matches('"connected":false', body)
    proxy:pass()
    H.wait_until(function() return get(port, "/healthz") == 200 end, 15, "healthy once consuming")
    code, body = get(port, "/healthz")
    assert.matches('^{"status":"ok","state":"consuming","connected":true,"in_flight":0,"done":0,'
      .. '"version":1}\n$', body)
    H.publish(q, 1, { prefix = "slow", body = "30" })
    H.wait_until(function() return #H.records(rec) == 1 end, 10, "the slow job")
    proc:signal("TERM")
    proc:wait_log("draining", 5)
    code, body = get(port, "/healthz")
    assert.equal(200, code)
    assert.matches('"state":"draining","connected":true,"in_flight":1', body)
    proxy:drop()
    -- The heartbeat (1 s) notices; the drain ends with the connection (75).
    assert.equal(75, proc:wait(10), proc:log())
    proxy:stop()
  end)

  it("reports a broken connection as unavailable while it reconnects", function()
    local q = H.queue("health-lost")
    local port = free_port()
    local proxy = H.proxy()
    local proc = H.worker(H.script("function handle() end"), q,
      { "--metrics", port, "--heartbeat", 1 }, nil, proxy.url)
    assert.equal(200, (get(port, "/healthz")))
    proxy:refuse()
    proxy:drop()
    H.wait_until(function() return get(port, "/healthz") == 503 end, 10, "unhealthy")
    local _, body = get(port, "/healthz")
    assert.matches('"state":"reconnecting","connected":false', body)
    local _, text = get(port, "/metrics")
    assert.equal(0, sample(text, "warren_connected"))
    proxy:pass()
    H.wait_until(function() return get(port, "/healthz") == 200 end, 15, "healthy again")
    _, text = get(port, "/metrics")
    assert.equal(1, sample(text, "warren_reconnects_total"))
    assert.equal(0, H.term(proc))
    proxy:stop()
  end)

  it("is not held up by clients that send nothing or a byte at a time", function()
    local q = H.queue("slowloris")
    local rec = H.record_file()
    local port = free_port()
    local script = H.script(H.TICKER_LUA)
    local proc = H.worker(script, q, { "--metrics", port }, { [H.RECORD_ENV] = rec })
    -- Six of the eight connections one address may hold.
    local idle, slow = {}, {}
    for i = 1, 3 do
      idle[i] = assert(socket.connect("127.0.0.1", port))
      slow[i] = assert(socket.connect("127.0.0.1", port))
    end
    H.publish(q, 1, { prefix = "tick", body = "3" })
    H.wait_until(function() return #H.records(rec) > 0 end, 10, "ticking")
    local request, sent, scrapes = "GET /metrics HTTP/1.1\r\nHost: x\r\n", 0, 0
    local deadline = H.now() + 2.5
    while H.now() < deadline do
      sent = sent + 1
      for i = 1, 3 do slow[i]:send(request:sub(sent, sent)) end
      local code = get(port, "/healthz")
      assert.equal(200, code)
      scrapes = scrapes + 1
      socket.sleep(0.1)
    end
    H.wait_until(function()
      local r = H.records(rec)
      return r[#r] and r[#r][1] == "end"
    end, 10, "the ticks to end")
    local ticks, worst = H.largest_gap(rec)
    assert.is_true(ticks > 100, ticks .. " ticks")
    assert.is_true(scrapes >= 10, scrapes .. " scrapes")
    assert.is_true(worst < 0.1, "a gap of " .. worst .. " s between ticks")
    for i = 1, 3 do idle[i]:close(); slow[i]:close() end
    assert.equal(0, H.term(proc))
  end)

  it("refuses a bad --metrics and a port in use with exit codes 64 and 69", function()
    local script = H.script("function handle() end")
    local code, out = H.run({ "--queue", "x", "--metrics", "example.com:80", script })
    assert.equal(64, code)
    assert.matches("--metrics: expected [HOST:]PORT", out, 1, true)
    local busy = assert(socket.bind("127.0.0.1", 0))
    local _, port = busy:getsockname()
    code, out = H.run({ "--url", H.url, "--queue", "x", "--metrics", "127.0.0.1:" .. port, script })
    busy:close()
    assert.equal(69, code)
    assert.matches("--metrics: cannot listen on 127.0.0.1:" .. port .. ": Address already in use",
      out, 1, true)
  end)
end)
