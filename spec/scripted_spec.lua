-- Scripted runs that end by themselves: --max-jobs and --until-empty exit 0
-- with exactly the right messages left, checked by message id.
local H = require "support.helper"

describe("scripted runs", function()
  after_each(H.stop_all)

  local function recorder()
    return H.script(H.RECORD_LUA .. [[
      local warren = require "warren"
      function handle(body, msg)
        warren.sleep(tonumber(body) or 0)
        record("done", msg.message_id)
      end]])
  end

  it("--max-jobs N starts N jobs, hands back the rest and exits 0", function()
    local q = H.queue("maxjobs")
    local rec = H.record_file()
    local ids = H.publish(q, 10, { prefix = "m", body = "0.2" })
    local proc = H.start(recorder(), { "--url", H.url, "--queue", q, "--prefetch", 3,
      "--max-jobs", 4 }, { env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, proc:wait(20), proc:log())
    assert.matches("started 4 jobs (--max-jobs)", proc:log(), 1, true)
    local done = {}
    for _, r in ipairs(H.records(rec)) do done[#done + 1] = r[2] end
    assert.same({ ids[1], ids[2], ids[3], ids[4] }, H.sorted(done))
    -- The other six are back, none of them run.
    assert.same({ table.unpack(ids, 5, 10) }, H.sorted(H.ids(H.drain(q))))
  end)

  it("--until-empty exits 0 once the queue is empty and nothing is in flight", function()
    local q = H.queue("untilempty")
    local rec = H.record_file()
    local ids = H.publish(q, 25, { prefix = "u", body = "0.01" })
    local proc = H.start(recorder(), { "--url", H.url, "--queue", q, "--prefetch", 4,
      "--until-empty" }, { env = { [H.RECORD_ENV] = rec } })
    assert.equal(0, proc:wait(20), proc:log())
    assert.matches("queue '" .. q:gsub("%-", "%%-") .. "' is empty %(%-%-until%-empty%), nothing in "
      .. "flight; exiting", proc:log())
    assert.equal(25, #H.records(rec))
    assert.same({}, H.drain(q))
    assert.equal(25, #ids)
  end)

  it("--until-empty on an empty queue exits at once", function()
    local q = H.queue("emptyalready")
    local t0 = H.now()
    local proc = H.start(recorder(), { "--url", H.url, "--queue", q, "--until-empty" })
    assert.equal(0, proc:wait(10), proc:log())
    assert.is_true(H.now() - t0 < 5, "took " .. (H.now() - t0) .. " s")
  end)

  it("--report writes one JSON line per job, matching the outcomes by message id", function()
    local cjson = require "cjson"
    local q, dlq = H.queue("report", { dead_letter = true })
    local report = H.tmpdir() .. "/report.jsonl"
    local script = H.script([[
      local warren = require "warren"
      function handle(body, msg)
        if body == "reject" then return warren.reject() end
        if body == "requeue" and not msg.redelivered then return warren.requeue() end
        if body == "fail" then error("no good\nat all") end
      end]])
    for _, body in ipairs({ "ok", "reject", "requeue", "fail" }) do
      H.publish(q, 1, { prefix = body, body = body })
    end
    local proc = H.start(script, { "--url", H.url, "--queue", q, "--until-empty",
      "--on-error", "reject", "--report", report })
    assert.equal(0, proc:wait(20), proc:log())
    local by = {}
    for line in (H.read_file(report) or ""):gmatch("[^\n]+") do
      local r = cjson.decode(line)
      by[r.message_id] = by[r.message_id] or {}
      table.insert(by[r.message_id], r)
    end
    assert.equal(1, #by.ok1)
    assert.same({ "ack", false, 0, 1, cjson.null }, { by.ok1[1].outcome, by.ok1[1].redelivered,
      by.ok1[1].retries, by.ok1[1].version, by.ok1[1].error })
    assert.equal(q, by.ok1[1].queue)
    assert.is_number(by.ok1[1].delivery_tag)
    assert.is_true(by.ok1[1].duration_s >= 0 and by.ok1[1].duration_s < 5)
    assert.equal("reject", by.reject1[1].outcome)
    assert.same({ "requeue", "ack" }, { by.requeue1[1].outcome, by.requeue1[2].outcome })
    assert.same({ false, true }, { by.requeue1[1].redelivered, by.requeue1[2].redelivered })
    assert.equal("reject", by.fail1[1].outcome)
    assert.matches(":5: no good\nat all$", by.fail1[1].error)
    assert.same({ "fail1", "reject1" }, H.ids(H.drain(dlq)))
    -- To standard output, with the logs on stderr.
    H.publish(q, 1, { prefix = "out", body = "ok" })
    local code, out = H.run({ "--url", H.url, "--queue", q, "--until-empty", "--report", "-",
      script }, { split = true })
    assert.equal(0, code)
    assert.equal("out1", cjson.decode(out).message_id)
  end)

  it("replays dead-lettered messages to their queue with examples/replay.lua", function()
    local q, dlq = H.queue("replay", { dead_letter = true })
    local rejecter = H.script([[
      function handle(body, msg) return require("warren").reject() end]])
    local ids = H.publish(q, 3, { prefix = "dead", body = "payload" })
    local proc = H.start(rejecter, { "--url", H.url, "--queue", q, "--until-empty" })
    assert.equal(0, proc:wait(20), proc:log())
    H.wait_until(function() return H.depth(dlq) == 3 end, 10, "three dead-lettered")
    local replay = H.start(H.source_dir .. "/examples/replay.lua",
      { "--url", H.url, "--queue", dlq, "--until-empty" })
    assert.equal(0, replay:wait(20), replay:log())
    assert.matches("replayed to " .. q:gsub("%-", "%%-"), replay:log())
    assert.equal(0, (H.depth(dlq)))
    -- Back in their queue, with their ids, and no longer marked as dead.
    local back = H.drain(q)
    assert.same(ids, H.sorted(H.ids(back)))
    for _, m in ipairs(back) do
      assert.equal(0, m.deaths)
      assert.equal(#"payload", m.len)
    end
  end)
end)
