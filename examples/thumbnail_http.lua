-- examples/thumbnail_http.lua: examples/thumbnail.lua over HTTP. Each message names an image
-- by URL; the job fetches it (warren.http, on the loop), makes the thumbnail with
-- vipsthumbnail (Debian package libvips-tools) in a child process, PUTs the result to a
-- target URL (a presigned object-storage URL, say) and announces it. Neither the image nor the
-- thumbnail passes through Lua's memory: both stream to and from temporary files.
--
-- The body is JSON:
--   {"src": "https://uploads.example/cat.jpg", "dst": "https://thumbs.example/cat-128.png",
--    "size": 128}
-- The thumbnail fits in size x size pixels, keeping the aspect ratio; its format follows the
-- extension of dst's path (.jpg when it has none). Once stored, a message goes to the queue
-- thumbnail.done (through the default exchange; THUMBNAIL_DONE names another queue) with the
-- JSON body {"src": ..., "dst": ..., "size": ..., "request": MESSAGE_ID}.
--
--   warren --queue thumbnails --prefetch 8 examples/thumbnail_http.lua
--
-- Outcomes: a request that can never work (not JSON, a bad field, a source that answers 4xx,
-- an image vipsthumbnail cannot read) is rejected, to the queue's dead-letter exchange if it
-- has one. A failure that may pass (a server unreachable or answering 5xx, a timeout, an
-- upload refused, the publish not confirmed) is an error: the failure policy retries it.
local warren = require "warren"
local cjson = require "cjson.safe"

local DONE_QUEUE = os.getenv("THUMBNAIL_DONE") or "thumbnail.done"
local TIMEOUT = 60 -- seconds for each of the download, the thumbnail and the upload
local MAX_SOURCE = 100 * 1024 * 1024 -- bytes of a source image

local TYPES = { jpg = "image/jpeg", jpeg = "image/jpeg", png = "image/png", webp = "image/webp",
  gif = "image/gif", tif = "image/tiff", tiff = "image/tiff" }

-- The request in body, or nil and why it is unusable.
local function parse(body)
  local req = cjson.decode(body)
  if type(req) ~= "table" then
    return nil, "the body is not a JSON object"
  end
  for _, field in ipairs({ "src", "dst" }) do
    if type(req[field]) ~= "string" or not req[field]:match("^https?://") then
      return nil, field .. " must be an http or https URL"
    end
  end
  local size = math.tointeger(req.size)
  if not size or size < 1 or size > 10000 then
    return nil, "size must be an integer from 1 to 10000"
  end
  local path = req.dst:match("^[^?#]*") -- a presigned URL's query is no part of the name
  local ext = (path:match("%.(%w+)$") or "jpg"):lower()
  if not TYPES[ext] then
    return nil, "dst must end in one of .jpg, .png, .webp, .gif, .tif"
  end
  return { src = req.src, dst = req.dst, size = size, ext = ext }
end

-- Two temporary paths, removed when the variable holding them goes out of scope: when the job
-- returns, fails, times out or is cut off by the forced stage.
local function scratch(ext)
  local base = os.tmpname()
  local files = { base = base, src = base .. ".src", out = base .. "." .. ext }
  return setmetatable(files, { __close = function(f)
    os.remove(f.base)
    os.remove(f.src)
    os.remove(f.out)
  end })
end

function handle(body, msg)
  local req, why = parse(body)
  if not req then
    warren.log.warn("rejecting the request:", why)
    return warren.reject()
  end
  local tmp <close> = scratch(req.ext)

  local got, err = warren.http({ url = req.src, output_file = tmp.src, timeout = TIMEOUT,
    max_body = MAX_SOURCE, follow = true })
  if not got then
    error("cannot fetch " .. req.src .. ": " .. err)
  end
  if got.status >= 400 and got.status < 500 then
    warren.log.warn("the source answered", got.status, "rejecting:", req.src)
    return warren.reject()
  end
  if got.status ~= 200 then
    error("fetching " .. req.src .. " gave status " .. got.status)
  end

  local geometry = req.size .. "x" .. req.size
  local r, serr = warren.spawn({ "vipsthumbnail", tmp.src, "--size", geometry, "-o", tmp.out },
    { timeout = TIMEOUT })
  if not r then
    error(serr) -- vipsthumbnail missing: worth a retry once it is installed
  end
  if r.timed_out then
    error("vipsthumbnail took more than " .. TIMEOUT .. " s on " .. req.src)
  end
  if not r.ok then
    warren.log.warn("vipsthumbnail failed on", req.src, "rejecting:", r.stderr)
    return warren.reject()
  end

  local put, perr = warren.http({ method = "PUT", url = req.dst, body_file = tmp.out,
    headers = { ["Content-Type"] = TYPES[req.ext] }, timeout = TIMEOUT })
  if not put then
    error("cannot upload to " .. req.dst .. ": " .. perr)
  end
  if put.status < 200 or put.status > 299 then
    error("the upload to " .. req.dst .. " gave status " .. put.status)
  end

  local ok, pub_err = warren.publish({
    exchange = "",
    routing_key = DONE_QUEUE,
    content_type = "application/json",
    body = cjson.encode({ src = req.src, dst = req.dst, size = req.size,
                          request = msg.message_id }),
  })
  if not ok then
    error("cannot publish to " .. DONE_QUEUE .. ": " .. pub_err)
  end
  warren.log.info("thumbnail", req.dst, "stored, within", geometry)
end
