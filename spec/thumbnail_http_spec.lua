-- examples/thumbnail_http.lua end to end, against a real local HTTP server: images fetched by
-- URL become thumbnails PUT back to the server, each announced on the done queue; unusable
-- requests are rejected.
local H = require "support.helper"
local httpserver = require "support.httpserver"
local cjson = require "cjson"

local images = require "support.images"

local dimensions = images.dimensions

describe("examples/thumbnail_http.lua", function()
  after_each(H.stop_all)

  it("fetches images by URL, PUTs their thumbnails, announces each, and rejects bad requests",
    function()
      local srv = httpserver.start()
      local work, dlq = H.queue("thumbhttp", { dead_letter = true })
      local done = H.queue("thumbhttpdone")
      images.black(srv.files .. "/wide.png", 400, 300)
      images.black(srv.files .. "/tall.png", 300, 400)
      H.write_file(srv.files .. "/text.png", "not an image\n")
      local function request(src, dst, size)
        return cjson.encode({ src = srv.base .. "/files/" .. src,
          dst = srv.base .. "/files/" .. dst, size = size })
      end
      H.publish(work, 1, { prefix = "wide", body = request("wide.png", "wide-100.png", 100) })
      H.publish(work, 1, { prefix = "tall", body = request("tall.png", "tall-64.jpg?sig=x", 64) })
      H.publish(work, 1, { prefix = "notjson", body = "{src: nope" })
      H.publish(work, 1, { prefix = "missing", body = request("nothing.png", "n.png", 10) })
      H.publish(work, 1, { prefix = "noimage", body = request("text.png", "text-10.png", 10) })

      local proc = H.start(H.source_dir .. "/examples/thumbnail_http.lua",
        { "--url", H.url, "--queue", work, "--prefetch", "5" }, { env = { THUMBNAIL_DONE = done } })
      H.wait_until(function() return H.depth(done) == 2 and H.depth(dlq) == 3 end, 30,
        "two thumbnails announced and three requests rejected")

      assert.same({ 100, 75 }, { dimensions(srv.files .. "/wide-100.png") })
      assert.same({ 48, 64 }, { dimensions(srv.files .. "/tall-64.jpg") })
      assert.is_true(srv:saw("^request PUT /files/wide%-100%.png$"))
      assert.is_nil(H.read_file(srv.files .. "/text-10.png"))

      local announced = {}
      for _ = 1, 2 do
        local m = cjson.decode((assert(H.get_body(done))))
        announced[m.request] = m
      end
      assert.same({ src = srv.base .. "/files/wide.png", dst = srv.base .. "/files/wide-100.png",
        size = 100, request = "wide1" }, announced.wide1)
      assert.same({ src = srv.base .. "/files/tall.png",
        dst = srv.base .. "/files/tall-64.jpg?sig=x", size = 64, request = "tall1" },
        announced.tall1)

      assert.same({ "missing1", "noimage1", "notjson1" }, H.ids(H.drain(dlq)))
      H.wait_until(function() return H.depth(work) == 0 end, 10, "the work queue empty")
      assert.equal(0, H.term(proc))
      local log = proc:log()
      assert.matches("rejecting the request: the body is not a JSON object", log, 1, true)
      assert.matches("the source answered 404 rejecting: " .. srv.base .. "/files/nothing.png",
        log, 1, true)
      assert.matches("vipsthumbnail failed on " .. srv.base .. "/files/text.png", log, 1, true)
    end)
end)
