-- Log formats: every record is one line whatever the message holds, job
-- records carry their fields, and the journal gets priorities.
local H = require "support.helper"
local cjson = require "cjson"

local function lines(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

-- A job that logs text with newlines, then fails with a traceback.
local SCRIPT = [[
  local warren = require "warren"
  function handle(body, msg)
    warren.log.info("two\nlines and a tab\there, quote \" and \\ backslash, byte \1")
    if body == "fail" then error("boom") end
  end]]

describe("log formats", function()
  after_each(H.stop_all)

  local function run(format)
    local q = H.queue("log-" .. format)
    local proc = H.worker(H.script(SCRIPT), q,
      { "--log-format", format, "--log-level", "debug", "--on-error", "reject" })
    H.publish(q, 1, { prefix = "ok" })
    H.publish(q, 1, { prefix = "bad", body = "fail" })
    proc:wait_log("reject %(%-%-on%-error reject%)", 10)
    assert.equal(0, H.term(proc))
    return q, proc:log()
  end

  it("json: every line is one JSON object, job records with their fields", function()
    local q, log = run("json")
    local failed, scripted
    for _, line in ipairs(lines(log)) do
      local ok, rec = pcall(cjson.decode, line)
      assert.is_true(ok and type(rec) == "table", "not a JSON object: " .. line)
      assert.is_string(rec.time)
      assert.is_truthy(({ debug = 1, info = 1, warn = 1, error = 1 })[rec.level], line)
      assert.is_string(rec.msg)
      if rec.id == "bad1" and rec.msg:match("^failed: .*boom") then failed = rec end
      if rec.id == "ok1" and rec.msg:match("^two") then scripted = rec end
    end
    assert.is_table(failed, log)
    assert.same({ q, 1 }, { failed.queue, failed.version })
    assert.is_number(failed.tag)
    assert.matches("boom\nstack traceback:\n", failed.msg, 1, true)
    assert.equal("two\nlines and a tab\there, quote \" and \\ backslash, byte \1", scripted.msg)
  end)

  it("logfmt: key=value records, job records with queue, id, tag and version", function()
    local q, log = run("logfmt")
    local failed
    for _, line in ipairs(lines(log)) do
      assert.matches('^time=%S+ level=%a+ msg=', line)
      if line:match(" id=bad1 ") and line:match('msg="failed: .*boom') then failed = line end
    end
    assert.is_string(failed, log)
    assert.matches(' queue=' .. q:gsub("%-", "%%-") .. ' id=bad1 tag=%d+ version=1$', failed)
    assert.matches("boom\\nstack traceback:\\n", failed, 1, true)
  end)

  it("text: a traceback and a script's newlines are escaped onto their line", function()
    local _, log = run("text")
    for _, line in ipairs(lines(log)) do
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT[%d:.]+Z %a+ +", line)
    end
    assert.matches("info  [ok1] two\\nlines and a tab\\there, quote \" and \\\\ backslash, byte \\x01\n",
      log, 1, true)
    assert.matches("error job bad1 %(tag %d+%) failed: [^\n]*boom\\nstack traceback:\\n", log)
  end)

  it("writes <N> priorities and no timestamp when stderr is the journal's stream", function()
    local dir = H.tmpdir()
    local script = H.script('require("warren").log.warn("careful")\nfunction handle() end\n')
    local err = dir .. "/stderr"
    -- The stream's device and inode, as systemd would put them in JOURNAL_STREAM.
    local cmd = "exec 2>" .. H.quote(err) .. "; JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) "
      .. H.quote(H.warren_bin) .. " check " .. H.quote(script)
    assert.is_true(os.execute("sh -c " .. H.quote(cmd) .. " >/dev/null"))
    assert.equal("<4>warn  careful\n", H.read_file(err))
    -- Redirected elsewhere, the variable no longer applies.
    local code, out = H.run({ "check", script }, { env = { JOURNAL_STREAM = "1:1" } })
    assert.equal(0, code)
    assert.matches("^%d%d%d%d%-[^\n]* warn  careful\n", out)
  end)

  it("refuses an unknown format with exit 64", function()
    local code, out = H.run({ "--queue", "x", "--log-format", "xml", H.script(SCRIPT) })
    assert.equal(64, code)
    assert.matches("--log-format: expected text, logfmt or json, got 'xml'", out, 1, true)
  end)
end)
