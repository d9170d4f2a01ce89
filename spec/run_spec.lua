-- scripts/run, the README's first command, as a new user runs it: options after the
-- script go to warren untouched, and Ctrl-C reaches warren as what it is.
local H = require "support.helper"

describe("scripts/run", function()
  after_each(H.stop_all)

  it("passes every option after the script to warren, and forwards SIGINT as SIGINT", function()
    local q = H.queue("run")
    local script = H.script("function handle() end")
    -- A shell starts background commands with SIGINT ignored; a terminal would not.
    local proc = H.spawn({ "env", "--default-signal=INT", H.source_dir .. "/scripts/run", script,
      "--url", H.url, "-q", q, "--max-retries", "2", "--prefetch", "3" })
    proc:wait_log("consuming '" .. q:gsub("%-", "%%-") .. "' from .*, prefetch 3", 120)
    local _, consumers = H.depth(q)
    assert.equal(1, consumers)
    proc:signal("INT")
    assert.equal(0, proc:wait(15), proc:log())
    assert.matches("received SIGINT", proc:log(), 1, true)
    assert.is_nil(proc:log():find("SIGTERM", 1, true), proc:log())
  end)

  it("wants the script first, and says so", function()
    local p = io.popen(H.quote(H.source_dir .. "/scripts/run") .. " -p 4 x.lua 2>&1; echo rc=$?")
    local out = p:read("a")
    p:close()
    assert.matches("run: the script comes first: scripts/run SCRIPT.lua [warren options...]\n",
      out, 1, true)
    assert.matches("rc=64\n$", out)
  end)
end)
