-- A broker that breaks AMQP: warren closes the connection with a logged
-- reason and reconnects; nothing is dropped silently, and no ack covers a
-- delivery that its job did not settle.
local H = require "support.helper"

local function settles(fake)
  local out = {}
  for _, r in ipairs(fake.records()) do
    if r[1] == "ack" or r[1] == "nack" or r[1] == "reject" or r[1] == "unknown-tag" then
      out[#out + 1] = r
    end
  end
  return out
end

local cases = {
  short = "a body shorter than its header said",
  long = "a body longer than its header said",
  nomethod = "content without a basic.deliver",
  channel = "a frame on a channel that is not open",
  cancel = "a basic.cancel for a consumer that is not ours",
  nocontent = "a basic.deliver without content, followed by another",
}

describe("a broker that breaks the protocol", function()
  after_each(H.stop_all)

  for _, scenario in ipairs({ "short", "long", "nomethod", "channel", "cancel", "nocontent" }) do
    it("is cut off and reconnected, losing nothing: " .. cases[scenario], function()
      local fake = H.fakebroker(scenario)
      local script = H.script("function handle(body, msg) end")
      local proc = H.start(script, { "--url", fake.url, "-q", "q", "--heartbeat", 0 })
      proc:wait_log("protocol error from the broker", 10)
      proc:wait_log("reconnected", 10)
      H.wait_until(function()
        local n = 0
        for _, r in ipairs(settles(fake)) do
          if r[1] == "ack" then n = n + 1 end
        end
        return n >= 3
      end, 10, "every message acked")
      assert.equal(0, H.term(proc), proc:log())
      local count = {}
      for _, r in ipairs(settles(fake)) do
        assert.equal("ack", r[1], "unexpected " .. r.line)
        -- Nothing on the first connection settled the delivery that broke it.
        assert.is_false(r[2] == "1" and r[3] == "m3", r.line)
        count[r[3]] = (count[r[3]] or 0) + 1
      end
      assert.same({ m1 = 1, m2 = 1, m3 = 1 }, count)
    end)
  end
end)
