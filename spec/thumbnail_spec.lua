-- examples/thumbnail.lua end to end: generated images become thumbnails of the requested size
-- through vipsthumbnail, each announced on the done queue; unusable requests are rejected.
local H = require "support.helper"
local cjson = require "cjson"

local images = require "support.images"

local dimensions = images.dimensions

describe("examples/thumbnail.lua", function()
  local proc
  after_each(function()
    if proc then proc:stop() end
  end)

  it("makes thumbnails that fit the size, announces each, and rejects bad requests", function()
    local work, dlq = H.queue("thumbnails", { dead_letter = true })
    local done = H.queue("thumbdone")
    local dir = H.tmpdir()
    images.black(dir .. "/wide.png", 400, 300)
    images.black(dir .. "/tall.png", 300, 400)
    H.write_file(dir .. "/text.png", "not an image\n")
    local function request(src, dst, size)
      return cjson.encode({ src = dir .. "/" .. src, dst = dir .. "/" .. dst, size = size })
    end
    H.publish(work, 1, { prefix = "wide", body = request("wide.png", "wide-100.png", 100) })
    H.publish(work, 1, { prefix = "tall", body = request("tall.png", "tall-64.jpg", 64) })
    H.publish(work, 1, { prefix = "notjson", body = "{src: nope" })
    H.publish(work, 1, { prefix = "nodst", body = cjson.encode({ src = dir .. "/wide.png",
      size = 10 }) })
    H.publish(work, 1, { prefix = "noimage", body = request("text.png", "text-10.png", 10) })

    proc = H.start(H.source_dir .. "/examples/thumbnail.lua",
      { "--url", H.url, "--queue", work, "--prefetch", "5" }, { env = { THUMBNAIL_DONE = done } })
    H.wait_until(function() return H.depth(done) == 2 and H.depth(dlq) == 3 end, 20,
      "two thumbnails announced and three requests rejected")

    assert.same({ 100, 75 }, { dimensions(dir .. "/wide-100.png") })
    assert.same({ 48, 64 }, { dimensions(dir .. "/tall-64.jpg") })
    assert.is_nil(H.read_file(dir .. "/text-10.png"))

    local announced = {}
    for _ = 1, 2 do
      local body = H.get_body(done)
      assert.is_string(body)
      local m = cjson.decode(body)
      announced[m.request] = m
    end
    assert.same({ src = dir .. "/wide.png", dst = dir .. "/wide-100.png", size = 100,
      request = "wide1" }, announced.wide1)
    assert.same({ src = dir .. "/tall.png", dst = dir .. "/tall-64.jpg", size = 64,
      request = "tall1" }, announced.tall1)

    assert.same({ "nodst1", "noimage1", "notjson1" }, H.ids(H.drain(dlq)))
    H.wait_until(function() return H.depth(work) == 0 end, 10, "the work queue empty")
    proc:signal("TERM")
    assert.equal(0, proc:wait(10))
    local log = proc:log()
    assert.matches("rejecting the request: the body is not a JSON object", log, 1, true)
    -- The size is a bound, not what came out (48x64 here).
    assert.matches("[tall1] thumbnail " .. dir .. "/tall-64.jpg written, within 64x64\n", log, 1,
      true)
    assert.matches("rejecting the request: dst must be an absolute path", log, 1, true)
    assert.matches("vipsthumbnail failed on " .. dir .. "/text.png", log, 1, true)
  end)
end)
