-- Many waiting jobs: each sleeps one second. When the last expected job has
-- woken it reports the first job's start and the last job's end.
local warren = require "warren"
local bench = require "bench_report"

local n, first = 0, nil

function handle()
  first = first or bench.gettime()
  warren.sleep(1)
  n = n + 1
  if n == bench.count then bench.report(string.format("%.6f %.6f", first, bench.gettime())) end
end
