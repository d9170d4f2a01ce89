-- A three-node cluster of its own (scripts/broker cluster, H.cluster): first proves the cluster
-- itself, then runs warren with the three URLs against a quorum queue replicated on all three
-- while the node it is connected to, then the queue's leader, stop and start again mid-stream.
local H = require "support.helper"
local cjson = require "cjson"

describe("a three-node cluster", function()
  local cluster

  setup(function()
    local started = H.now()
    cluster = H.cluster()
    cluster.start_time = H.now() - started
  end)

  teardown(function()
    if cluster then cluster:stop() end
  end)

  -- rabbitmqctl against member n with JSON output; -> the decoded value.
  local function ctl_json(n, ...)
    local args = { "-q", ... }
    args[#args + 1] = "--formatter"
    args[#args + 1] = "json"
    local ok, out = cluster:ctl(n, table.unpack(args))
    assert(ok, out)
    return cjson.decode(out)
  end

  local function sorted(list)
    local copy = table.move(list, 1, #list, 1, {})
    table.sort(copy)
    return copy
  end

  local function wtool_ok(n, ...)
    local code, out, err = H.wtool({ "--url", cluster.urls[n], "--timeout", 30, ... })
    assert(code == 0, err)
    return out
  end

  it("starts three members that all see the three running", function()
    print(string.format("cluster start took %.1f s", cluster.start_time))
    assert.equal(3, #cluster.urls)
    for n = 1, 3 do
      assert.matches("^amqp://guest:guest@127%.0%.0%.1:%d+$", cluster.urls[n])
      for m = n + 1, 3 do
        assert.are_not.equal(cluster.urls[n], cluster.urls[m])
      end
    end
    for n = 1, 3 do
      local status = ctl_json(n, "cluster_status")
      assert.same(sorted(cluster.names), sorted(status.running_nodes))
      assert.same(sorted(cluster.names), sorted(status.disk_nodes))
    end
  end)

  it("declares a quorum queue with a member on each node, reachable from every member", function()
    local q = H.unique_name("support-quorum")
    wtool_ok(1, "declare", q, "--quorum")
    wtool_ok(2, "publish", q, "--count", 5)
    assert.equal("5 0\n", wtool_ok(3, "depth", q))
    local found
    for _, info in ipairs(ctl_json(2, "list_queues", "name", "type", "members", "online")) do
      if info.name == q then found = info end
    end
    assert.is_table(found)
    assert.equal("quorum", found.type)
    assert.same(sorted(cluster.names), sorted(found.members))
    assert.same(sorted(cluster.names), sorted(found.online))
  end)

  it("stops one member and starts it again: it rejoins, at the same URL", function()
    local q = H.unique_name("support-failover")
    wtool_ok(1, "declare", q, "--quorum")
    local url2 = cluster.urls[2]
    cluster:stop_node(2)
    local status = ctl_json(1, "cluster_status")
    assert.same(sorted({ cluster.names[1], cluster.names[3] }), sorted(status.running_nodes))
    assert.equal(3, #status.disk_nodes)
    -- The quorum queue goes on with two of its three members.
    wtool_ok(3, "publish", q, "--count", 2)
    assert.equal("2 0\n", wtool_ok(1, "depth", q))
    local ok = cluster:ctl(2, "-q", "status")
    assert.is_false(ok)

    assert.equal(url2, cluster:start_node(2))
    status = ctl_json(2, "cluster_status")
    assert.same(sorted(cluster.names), sorted(status.running_nodes))
    H.wait_until(function()
      for _, info in ipairs(ctl_json(2, "list_queues", "name", "online")) do
        if info.name == q then return #info.online == 3 end
      end
    end, 30, "the restarted member back in the quorum queue")
    assert.equal("2 0\n", wtool_ok(2, "depth", q))
  end)

  -- The member whose URL has the port in warren's log line from mark on, and that line.
  local function connected_member(proc, pattern, mark)
    proc:wait_log(pattern, 15, mark)
    local line = proc:log():sub(mark + 1):match("[^\n]*" .. pattern .. "[^\n]*")
    local port = line:match("127%.0%.0%.1:(%d+)")
    for n = 1, 3 do
      if cluster.urls[n]:match(":(%d+)$") == port then return n end
    end
    error("no member has port " .. tostring(port) .. ": " .. line)
  end

  local function leader(q, asking)
    for _, info in ipairs(ctl_json(asking, "list_queues", "name", "leader")) do
      if info.name == q then
        for n = 1, 3 do
          if cluster.names[n] == info.leader then return n end
        end
      end
    end
    error("no leader for " .. q)
  end

  it("loses nothing when warren's node, then the queue's leader, stop mid-stream", function()
    local q = H.unique_name("failover")
    wtool_ok(1, "declare", q, "--quorum")
    local rec = H.record_file()
    local script = H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        warren.sleep(0.02)
        record("done", msg.message_id, tostring(msg.redelivered), now())
      end]])
    local proc = H.start(script, { "--url", cluster.urls[1], "--url", cluster.urls[2], "--url",
      cluster.urls[3], "-q", q, "--prefetch", 10 }, { env = { [H.RECORD_ENV] = rec } })
    local ids = {}
    local function publish(n, prefix, via)
      wtool_ok(via, "publish", q, "--count", n, "--prefix", prefix)
      for i = 1, n do ids[#ids + 1] = prefix .. i end
    end
    local function done() return #H.records(rec) end
    -- Consuming again: while messages are ready, a job ends after the stop, past those that
    -- were in flight then (each takes 0.02 s).
    local function resumes_within(seconds, since, what)
      local ok, t = pcall(H.wait_until, function()
        for _, r in ipairs(H.records(rec)) do
          if tonumber(r[4]) > since + 0.2 then return tonumber(r[4]) end
        end
      end, 3 * seconds, what)
      assert(ok, tostring(t) .. "; warren's log ends:\n" .. proc:log():sub(-3000))
      assert.is_true(t - since <= seconds, what .. " after " .. (t - since) .. " s")
    end

    local c = connected_member(proc, "consuming '", 0)
    local live = c % 3 + 1
    publish(2000, "a", live)
    H.wait_until(function() return done() >= 300 end, 20, "300 jobs")
    local mark = proc:mark()
    cluster:stop_node(c)
    local stopped = H.now()
    publish(1500, "b", live)
    local now_on = connected_member(proc, "reconnected to ", mark)
    assert.are_not.equal(c, now_on)
    resumes_within(5, stopped, "jobs after stopping member " .. c)
    cluster:start_node(c)
    H.wait_until(function()
      for _, info in ipairs(ctl_json(c, "list_queues", "name", "online")) do
        if info.name == q then return #info.online == 3 end
      end
    end, 30, "member " .. c .. " back in the queue")

    publish(1000, "c", c)
    local l = leader(q, c)
    -- Mid-stream: the third batch, published through the member that came back, is being
    -- handled when the leader stops; a fourth comes once it has stopped, so that jobs after
    -- the stop are there to see even when the third batch ends while the node shuts down.
    local ok, err = pcall(H.wait_until, function()
      local n = 0
      for _, r in ipairs(H.records(rec)) do
        if r[2]:sub(1, 1) == "c" then n = n + 1 end
      end
      return n >= 100
    end, 30, "jobs of the third batch")
    assert(ok, tostring(err) .. "; warren's log ends:\n" .. proc:log():sub(-3000))
    cluster:stop_node(l)
    stopped = H.now()
    publish(500, "d", l % 3 + 1)
    resumes_within(5, stopped, "jobs after stopping the leader, member " .. l)
    cluster:start_node(l)
    H.wait_until(function() return done() >= #ids end, 60, "every message")

    -- 0 lost; a message handled twice only when the broker said it was redelivered.
    local seen = {}
    for _, r in ipairs(H.records(rec)) do
      if seen[r[2]] then
        assert.equal("true", r[3], r[2] .. " handled again without redelivered")
      end
      seen[r[2]] = true
    end
    for _, id in ipairs(ids) do assert.is_true(seen[id], id .. " lost") end
    proc:signal("TERM")
    assert.equal(0, proc:wait(15), proc:log())
    assert.equal("0 0\n", wtool_ok(c, "depth", q))
  end)

  it("stops every member, leaving no process behind", function()
    local dir = cluster.dir
    assert.are_not.same({}, H.pids_in(dir))
    cluster:stop()
    assert.same({}, H.pids_in(dir))
    local code, out = H.broker_script(dir, { "cluster", "status" })
    assert.equal(1, code)
    for n = 1, 3 do
      assert.matches(n .. " stopped", out)
    end
    -- epmd may serve other nodes on this machine, but none of these.
    local p = io.popen("epmd -names 2>/dev/null")
    local names = p:read("a")
    p:close()
    local id = cluster.names[1]:match("^warren%-(%x+)%-")
    assert.is_nil(names:find("warren-" .. id, 1, true))
  end)
end)
