-- Proves the three-node test cluster (scripts/broker cluster, H.cluster). Needs no test broker:
-- it starts a cluster of its own.
local H = require "support.helper"
local cjson = require "cjson"

describe("support.helper cluster", function()
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
