-- The seed workload: one second of work per '.' in the body.
-- Publish "hello..." and the job takes three seconds.
local warren = require "warren"

function handle(body, msg)
  warren.log.info("received", body)
  local _, dots = body:gsub("%.", "")
  warren.sleep(dots) -- yields to the loop: other jobs, heartbeats and signals go on
  warren.log.info("done")
end -- returning normally acks the message
