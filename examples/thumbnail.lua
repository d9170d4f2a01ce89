-- examples/thumbnail.lua: one thumbnail per message, made by vipsthumbnail (Debian package
-- libvips-tools) in a child process while other jobs, heartbeats and signals go on.
--
-- The body is JSON: {"src": "/srv/uploads/cat.jpg", "dst": "/srv/thumbs/cat.jpg", "size": 128}.
-- The thumbnail fits in size x size pixels, keeping the aspect ratio; its format follows dst's
-- extension. When it is written, a message goes to the queue thumbnail.done (through the
-- default exchange; THUMBNAIL_DONE names another queue) with the JSON body
-- {"src": ..., "dst": ..., "size": ..., "request": MESSAGE_ID}. That queue must exist:
-- an unroutable message is an error, and the job is retried.
--
--   warren --queue thumbnails --prefetch 4 examples/thumbnail.lua
--   amqp-publish -p -r thumbnails -b '{"src": "/tmp/in.png", "dst": "/tmp/out.png", "size": 128}'
--
-- Outcomes: a request that can never work (not JSON, a missing field, an image vipsthumbnail
-- cannot read) is rejected, to the queue's dead-letter exchange if it has one. A failure that
-- may pass (vipsthumbnail not installed, a timeout, the publish not confirmed) is an error:
-- the failure policy retries it later (1 s, 5 s, 30 s ...) and rejects it after --max-retries.
local warren = require "warren"
local cjson = require "cjson.safe"

local DONE_QUEUE = os.getenv("THUMBNAIL_DONE") or "thumbnail.done"
local TIMEOUT = 60 -- seconds for one thumbnail

-- The request in body, or nil and why it is unusable.
local function parse(body)
  local req = cjson.decode(body)
  if type(req) ~= "table" then
    return nil, "the body is not a JSON object"
  end
  if type(req.src) ~= "string" or req.src == "" then
    return nil, "src must be a path"
  end
  -- vipsthumbnail puts a relative output next to the input and expands % in it.
  if type(req.dst) ~= "string" or not req.dst:match("^/") or req.dst:find("%", 1, true) then
    return nil, "dst must be an absolute path without '%'"
  end
  local size = math.tointeger(req.size)
  if not size or size < 1 or size > 10000 then
    return nil, "size must be an integer from 1 to 10000"
  end
  return { src = req.src, dst = req.dst, size = size }
end

function handle(body, msg)
  local req, why = parse(body)
  if not req then
    warren.log.warn("rejecting the request:", why)
    return warren.reject()
  end

  local geometry = req.size .. "x" .. req.size
  local r, err = warren.spawn({ "vipsthumbnail", req.src, "--size", geometry, "-o", req.dst },
    { timeout = TIMEOUT })
  if not r then
    error(err) -- vipsthumbnail missing: worth a retry once it is installed
  end
  if r.timed_out then
    error("vipsthumbnail took more than " .. TIMEOUT .. " s on " .. req.src)
  end
  if not r.ok then
    warren.log.warn("vipsthumbnail failed on", req.src, "rejecting:", r.stderr)
    return warren.reject()
  end

  local ok, perr = warren.publish({
    exchange = "",
    routing_key = DONE_QUEUE,
    content_type = "application/json",
    body = cjson.encode({ src = req.src, dst = req.dst, size = req.size,
                          request = msg.message_id }),
  })
  if not ok then
    error("cannot publish to " .. DONE_QUEUE .. ": " .. perr)
  end
  warren.log.info("thumbnail", req.dst, "written, within", geometry)
end
