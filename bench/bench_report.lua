-- Shared by the benchmark job scripts: a wall clock with microseconds (plain
-- Lua only has whole seconds), the number of messages the run expects, and
-- how a script hands its result to scripts/bench.
local warren = require "warren"

local M = {}

M.gettime = warren.now
M.count = assert(tonumber(os.getenv("WARREN_BENCH_COUNT")), "WARREN_BENCH_COUNT must be set")
local out = assert(os.getenv("WARREN_BENCH_OUT"), "WARREN_BENCH_OUT must be set")

-- Writes the result line; scripts/bench polls for the file, so it appears
-- only once complete (written aside, then renamed).
function M.report(line)
  local f = assert(io.open(out .. ".part", "w"))
  assert(f:write(line, "\n"))
  assert(f:close())
  assert(os.rename(out .. ".part", out))
end

return M
