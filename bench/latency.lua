-- Latency: each body is its send time (bench/publish_rate); a job notes how
-- long ago that was as it starts. After the last expected message it reports
-- p50, p99 and max in milliseconds.
local bench = require "bench_report"

local lat = {}

function handle(body)
  lat[#lat + 1] = bench.gettime() - tonumber(body)
  if #lat == bench.count then
    table.sort(lat)
    local function at(q) return lat[math.max(1, math.ceil(q * #lat))] * 1e3 end
    bench.report(string.format("%.3f %.3f %.3f", at(0.50), at(0.99), lat[#lat] * 1e3))
  end
end
