-- spec/support/images.lua: test images for the thumbnail examples' specs, made and measured
-- with the vips tools (Debian package libvips-tools).
--
--   local images = require "support.images"
--   images.black(path, width, height)    -- a black image; the format follows the extension
--   images.dimensions(path) -> width, height
local H = require "support.helper"

local images = {}
local q = H.quote

-- Runs a shell command; returns its output, or raises with it when the command fails.
local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  local ok = p:close()
  assert(ok, cmd .. " failed:\n" .. out)
  return out
end

function images.black(path, width, height)
  sh("vips black " .. q(path) .. " " .. width .. " " .. height)
end

function images.dimensions(path)
  return tonumber(sh("vipsheader -f width " .. q(path))),
    tonumber(sh("vipsheader -f height " .. q(path)))
end

return images
