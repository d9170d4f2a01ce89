-- How to test a job script without a broker: busted runs `warren try` on it, which is the
-- real host (sleeps, programs, logs, the failure policy) fed with bodies instead of a queue.
--
--   busted examples/dots_spec.lua      (WARREN_BIN names warren; by default the one on PATH)
local WARREN = os.getenv("WARREN_BIN") or "warren"
local SCRIPT = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "dots.lua"

local function quote(s)
  return "'" .. s:gsub("'", [['\'']]) .. "'"
end

-- Runs the script on the bodies; returns the exit code, what try printed (one outcome per
-- body, and the messages a job would publish as JSON lines) and the log.
local function try(...)
  local words = { quote(WARREN), "try", quote(SCRIPT) }
  for _, body in ipairs({ ... }) do words[#words + 1] = quote(body) end
  local log = os.tmpname()
  local p = io.popen(table.concat(words, " ") .. " 2>" .. quote(log))
  local out = p:read("a")
  local _, _, code = p:close()
  local f = io.open(log)
  local err = f:read("a")
  f:close()
  os.remove(log)
  return code, out, err
end

describe("examples/dots.lua", function()
  it("acks a body without dots at once", function()
    local code, out, err = try("hello")
    assert.equal(0, code)
    assert.equal("try-1: ack\n", out)
    assert.matches("received hello\n", err, 1, true)
  end)

  it("works a second per dot, then acks", function()
    local started = os.time()
    local code, out = try("a.", "b.")
    assert.equal(0, code)
    assert.equal("try-1: ack\ntry-2: ack\n", out)
    assert.is_true(os.time() - started >= 1)
  end)
end)
