-- A small fake AMQP 0-9-1 broker for specs of a broker that breaks the
-- protocol. It logs warren in, accepts a queue check and a consumer, and
-- then plays a scenario on the FIRST consuming connection: two good
-- deliveries, and once their acks are in, frames that break the protocol.
-- Later consuming connections get every message not acked yet, well formed
-- and marked redelivered. It records what warren settles, one line each:
--   ack CONN ID       (a tag acked, singly or by a multiple ack)
--   nack CONN ID / reject CONN ID
--   consume CONN      (a connection started consuming)
--
--   lua5.4 fakebroker.lua PORT_FILE RECORD_FILE SCENARIO OWNER_PID
-- SCENARIO: short | long | nomethod | channel | cancel | nocontent
-- It exits when OWNER_PID (the spec) is gone.
local socket = require "socket"

local port_file, record_file, scenario, owner = arg[1], arg[2], arg[3], arg[4]
local MESSAGES = { "m1", "m2", "m3" }

local function record(line)
  local f = assert(io.open(record_file, "a"))
  f:write(line, "\n")
  f:close()
end

local function frame(kind, channel, payload)
  return string.pack(">BI2s4", kind, channel, payload) .. "\206"
end

local function method(channel, class, id, args)
  return frame(1, channel, string.pack(">I2I2", class, id) .. (args or ""))
end

local function deliver(tag, id, redelivered, channel)
  local m = method(channel or 1, 60, 60, string.pack(">s1I8Bs1s1", "ctag", tag,
    redelivered and 1 or 0, "", "q"))
  return m, id
end

local function header(size, id)
  return frame(2, 1, string.pack(">I2I2I8I2s1", 60, 0, size, 0x0080, id))
end

local function body(bytes)
  return frame(3, 1, bytes)
end

local function message(tag, id, redelivered)
  local body_bytes = "body of " .. id
  return deliver(tag, id, redelivered) .. header(#body_bytes, id) .. body(body_bytes)
end

local server = assert(socket.bind("127.0.0.1", 0))
server:settimeout(0)
local _, port = server:getsockname()
do
  local f = assert(io.open(port_file .. ".tmp", "w"))
  f:write(port, "\n")
  f:close()
  assert(os.rename(port_file .. ".tmp", port_file))
end

local conns = {}
local nconn = 0
local played = false
local acked = {} -- id -> true

local function send(c, bytes)
  local i = 1
  while i <= #bytes do
    local n, err, partial = c.sock:send(bytes, i)
    if n then
      i = n + 1
    elseif err == "timeout" then
      i = partial + 1
      socket.select(nil, { c.sock }, 1)
    else
      c.dead = true
      return
    end
  end
end

local function settle(c, kind, tag, multiple)
  local tags = {}
  if multiple then
    for t, _ in pairs(c.tags) do
      if t <= tag then tags[#tags + 1] = t end
    end
  else
    tags[1] = tag
  end
  table.sort(tags)
  for _, t in ipairs(tags) do
    local id = c.tags[t]
    if id then
      c.tags[t] = nil
      record(kind .. " " .. c.n .. " " .. id)
      if kind == "ack" then acked[id] = true end
    else
      record("unknown-tag " .. c.n .. " " .. t)
    end
  end
end

-- The frames that break the protocol, after the good deliveries 1 and 2.
local function violate(c)
  if scenario == "short" then
    local m = deliver(3, "m3")
    send(c, m .. header(10, "m3") .. body("12345") .. deliver(4, "m4"))
  elseif scenario == "long" then
    send(c, deliver(3, "m3") .. header(5, "m3") .. body("1234567890"))
  elseif scenario == "nomethod" then
    send(c, header(5, "m3") .. body("12345"))
  elseif scenario == "channel" then
    send(c, (deliver(3, "m3", false, 7)))
  elseif scenario == "cancel" then
    send(c, method(1, 60, 30, string.pack(">s1B", "not-ours", 0)))
  elseif scenario == "nocontent" then
    send(c, deliver(3, "m3") .. deliver(4, "m4"))
  else
    error("unknown scenario " .. tostring(scenario))
  end
  -- The bad delivery's tag, as warren saw it (none for the frames without one).
  if scenario ~= "nomethod" and scenario ~= "channel" and scenario ~= "cancel" then
    c.tags[3] = "m3"
  end
end

local function start_consuming(c)
  c.consuming = true
  record("consume " .. c.n)
  if not played then
    played = true
    c.scenario = true
    c.tags[1], c.tags[2] = "m1", "m2"
    send(c, message(1, "m1", false) .. message(2, "m2", false))
    return
  end
  local tag = 0
  for _, id in ipairs(MESSAGES) do
    if not acked[id] then
      tag = tag + 1
      c.tags[tag] = id
      send(c, message(tag, id, true))
    end
  end
end

local function on_method(c, channel, class, id, args)
  local key = class * 1000 + id
  if key == 10011 then -- start-ok
    send(c, method(0, 10, 30, string.pack(">I2I4I2", 2047, 131072, 0)))
  elseif key == 10031 then -- tune-ok
  elseif key == 10040 then -- open
    send(c, method(0, 10, 41, string.pack(">s1", "")))
  elseif key == 10050 then -- connection.close
    send(c, method(0, 10, 51))
    c.dead = true
  elseif key == 10051 then -- close-ok
    c.dead = true
  elseif key == 20010 then -- channel.open
    send(c, method(channel, 20, 11, string.pack(">s4", "")))
  elseif key == 20040 then -- channel.close
    send(c, method(channel, 20, 41))
  elseif key == 60010 then -- qos
    send(c, method(channel, 60, 11))
  elseif key == 50010 then -- queue.declare
    send(c, method(channel, 50, 11, string.pack(">s1I4I4", "q", 0, 0)))
  elseif key == 85010 then -- confirm.select
    send(c, method(channel, 85, 11))
  elseif key == 60020 then -- basic.consume
    send(c, method(channel, 60, 21, string.pack(">s1", "ctag")))
    start_consuming(c)
  elseif key == 60030 then -- basic.cancel from warren
    local tag = string.unpack(">s1", args)
    send(c, method(channel, 60, 31, string.pack(">s1", tag)))
  elseif key == 60080 then -- basic.ack
    local tag, bits = string.unpack(">I8B", args)
    settle(c, "ack", tag, bits & 1 == 1)
    if c.scenario and not c.violated and not c.tags[1] and not c.tags[2] then
      c.violated = true
      violate(c)
    end
  elseif key == 60120 then -- basic.nack
    local tag, bits = string.unpack(">I8B", args)
    settle(c, "nack", tag, bits & 1 == 1)
  elseif key == 60090 then -- basic.reject
    local tag = string.unpack(">I8", args)
    settle(c, "reject", tag, false)
  end
end

local function on_data(c)
  while true do
    if not c.greeted then
      if #c.buf < 8 then return end
      c.buf = c.buf:sub(9)
      c.greeted = true
      send(c, method(0, 10, 10, string.pack(">BBs4s4s4", 0, 9, "", "PLAIN", "en_US")))
    else
      if #c.buf < 7 then return end
      local kind, channel, size = string.unpack(">BI2I4", c.buf)
      if #c.buf < 8 + size then return end
      local payload = c.buf:sub(8, 7 + size)
      c.buf = c.buf:sub(9 + size)
      if kind == 1 then
        local class, id = string.unpack(">I2I2", payload)
        on_method(c, channel, class, id, payload:sub(5))
      end
    end
  end
end

local last_owner_check = 0
while true do
  local now = socket.gettime()
  if now - last_owner_check > 1 then
    last_owner_check = now
    if not os.execute("kill -0 " .. owner .. " 2>/dev/null") then os.exit(0) end
  end
  local watch = { server }
  for _, c in ipairs(conns) do watch[#watch + 1] = c.sock end
  local readable = socket.select(watch, nil, 0.2)
  for _, s in ipairs(readable) do
    if s == server then
      local sock = server:accept()
      if sock then
        sock:settimeout(0)
        nconn = nconn + 1
        conns[#conns + 1] = { sock = sock, buf = "", tags = {}, n = nconn }
      end
    else
      for _, c in ipairs(conns) do
        if c.sock == s then
          local data, err, partial = s:receive(65536)
          data = data or partial
          if data and #data > 0 then
            c.buf = c.buf .. data
            on_data(c)
          end
          if err == "closed" then c.dead = true end
        end
      end
    end
  end
  for i = #conns, 1, -1 do
    if conns[i].dead then
      conns[i].sock:close()
      table.remove(conns, i)
    end
  end
end
