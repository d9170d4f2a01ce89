-- examples/replay.lua: puts dead-lettered messages back on the queue they died in.
--
-- A message rejected from a queue with a dead-letter exchange arrives in the dead-letter
-- queue with an x-death header; its first entry names the queue it came from. This script
-- publishes each one back there (through the default exchange, persistent), with its body
-- and properties, but without x-death and without x-warren-retries, so that it gets a
-- whole new set of retries. Run it over the dead-letter queue until that queue is empty:
--
--   warren --queue thumbnails.dlq --until-empty --report - examples/replay.lua
--
-- A message without x-death was not dead-lettered: it is left alone (requeued would loop
-- forever, so it is rejected, which with no dead-letter exchange on the dead-letter queue
-- drops it; give that queue none, or change the script, to keep such messages).
local warren = require "warren"

-- Properties copied onto the replayed message. user_id is left out: the broker refuses a
-- user_id other than the publisher's own login.
local PROPERTIES = { "content_type", "content_encoding", "correlation_id", "reply_to",
  "message_id", "type", "app_id", "priority", "timestamp" }

function handle(body, msg)
  local deaths = msg.headers["x-death"]
  local from = type(deaths) == "table" and type(deaths[1]) == "table" and deaths[1].queue
  if type(from) ~= "string" or from == "" then
    warren.log.warn("no x-death header naming a queue; not replaying it")
    return warren.reject()
  end
  local headers = {}
  for k, v in pairs(msg.headers) do
    if k ~= "x-death" and k ~= "x-warren-retries" and not k:match("^x%-first%-death%-") then
      headers[k] = v
    end
  end
  local copy = { exchange = "", routing_key = from, body = body, headers = headers }
  for _, name in ipairs(PROPERTIES) do copy[name] = msg[name] end
  local ok, err = warren.publish(copy)
  if not ok then error("cannot replay to " .. from .. ": " .. err) end
  warren.log.info("replayed to", from)
end
