-- Throughput: a job that does nothing but count. When the last expected
-- message has run it reports the wall-clock times of the first job's start
-- and the last job's end, so connecting and start-up are not timed.
local bench = require "bench_report"

local n, first = 0, nil

function handle()
  n = n + 1
  if n == 1 then first = bench.gettime() end
  if n == bench.count then bench.report(string.format("%.6f %.6f", first, bench.gettime())) end
end
