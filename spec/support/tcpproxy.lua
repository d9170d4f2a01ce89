-- tcpproxy.lua: a small TCP proxy whose links can be held, dropped or refused on demand, so
-- that specs can simulate a black-holed or broken network between warren and the broker.
--
--   lua5.4 tcpproxy.lua LISTEN_PORT TARGET_HOST TARGET_PORT CONTROL_FILE [OWNER_PID]
--
-- It listens on 127.0.0.1:LISTEN_PORT (0 picks a free port) and forwards every accepted
-- connection to TARGET_HOST:TARGET_PORT, both ways, for any number of connections. Once
-- listening it writes the port to CONTROL_FILE.port.
--
-- CONTROL_FILE holds "MODE [SEQ]"; it is read every ~20 ms, and after a command has taken
-- effect SEQ is written to CONTROL_FILE.ack (so a controller can wait for it). Modes:
--   pass    forward bytes (the default);
--   hold    a black hole: every socket stays open but nothing is read, written or accepted;
--   drop    close every current connection (both sides) once, then forward as in pass;
--   refuse  close every connection and the listening socket, so connects are refused;
--           pass or hold listen again on the same port.
--
-- The proxy is bounded: it exits when CONTROL_FILE is removed, when the OWNER_PID process is
-- gone, and on SIGTERM.
local socket = require "socket"

local listen_port, target_host, target_port, control_file, owner_pid = table.unpack(arg, 1, 5)
if not (listen_port and target_host and target_port and control_file) then
  io.stderr:write("usage: tcpproxy.lua LISTEN_PORT TARGET_HOST TARGET_PORT CONTROL_FILE",
    " [OWNER_PID]\n")
  os.exit(64)
end
listen_port, target_port = tonumber(listen_port), tonumber(target_port)

-- Most bytes buffered towards one side before the proxy stops reading from the other.
local BUFFER_LIMIT = 1024 * 1024
local CONTROL_INTERVAL = 0.02
local OWNER_INTERVAL = 1.0

local function log(...)
  io.stderr:write("tcpproxy: ", table.concat({ ... }, " "), "\n")
end

local function write_atomically(path, text)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(text)
  f:close()
  assert(os.rename(tmp, path))
end

-- Connection sides. Each accepted connection has two sides, client and upstream; a side
-- holds its socket, its peer side, and the bytes waiting to be written to its socket.
local sides = {} -- socket -> side
local listener = nil
local mode = "pass"

local function open_listener()
  local sock, err = socket.bind("127.0.0.1", listen_port, 64)
  if not sock then
    log("cannot listen on port", tostring(listen_port), err)
    return false
  end
  sock:settimeout(0)
  listener = sock
  listen_port = select(2, sock:getsockname())
  return true
end

local function close_connection(side)
  for _, s in ipairs({ side, side.peer }) do
    if sides[s.sock] then
      sides[s.sock] = nil
      s.sock:close()
    end
  end
end

local function close_all()
  local all = {}
  for _, side in pairs(sides) do
    all[#all + 1] = side
  end
  for _, side in ipairs(all) do
    close_connection(side)
  end
end

local function new_side(sock)
  sock:settimeout(0)
  sock:setoption("tcp-nodelay", true)
  local side = { sock = sock, out = "", eof = false }
  sides[sock] = side
  return side
end

local function accept_one()
  local client = listener:accept()
  if not client then
    return
  end
  local upstream = socket.tcp()
  upstream:settimeout(3)
  local ok, err = upstream:connect(target_host, target_port)
  if not ok then
    log("cannot reach target", target_host, tostring(target_port), err)
    upstream:close()
    client:close()
    return
  end
  local a, b = new_side(client), new_side(upstream)
  a.peer, b.peer = b, a
end

-- Reads what is available from side and queues it towards its peer. At end of stream the
-- connection is closed once the bytes already read have been written to the peer.
local function read_side(side)
  local data, err, partial = side.sock:receive(65536)
  data = data or partial
  if data and #data > 0 then
    side.peer.out = side.peer.out .. data
  end
  if err and err ~= "timeout" then
    side.eof = true
  end
end

local function write_side(side)
  local last, err, partial_last = side.sock:send(side.out)
  last = last or partial_last or 0
  side.out = side.out:sub(last + 1)
  if err and err ~= "timeout" then
    close_connection(side)
  end
end

-- Closes connections whose reading side ended and whose remaining bytes are delivered.
local function reap_finished()
  local done = {}
  for _, side in pairs(sides) do
    if side.eof and #side.peer.out == 0 then
      done[#done + 1] = side
    end
  end
  for _, side in ipairs(done) do
    close_connection(side)
  end
end

local function apply(new_mode)
  if new_mode == "drop" then
    close_all()
    new_mode = "pass"
  elseif new_mode == "refuse" then
    close_all()
    if listener then
      listener:close()
      listener = nil
    end
  end
  if (new_mode == "pass" or new_mode == "hold") and not listener then
    open_listener()
  end
  mode = new_mode
end

local last_command = nil

-- Reads the control file; returns false when it is gone (the signal to exit).
local function check_control()
  local f = io.open(control_file, "r")
  if not f then
    return false
  end
  local text = f:read("a") or ""
  f:close()
  if text ~= last_command then
    local new_mode, seq = text:match("^%s*(%a+)%s*(%d*)")
    if new_mode == "pass" or new_mode == "hold" or new_mode == "drop" or new_mode == "refuse" then
      apply(new_mode)
      last_command = text
      if seq ~= "" then
        write_atomically(control_file .. ".ack", seq .. "\n")
      end
    elseif text:match("%S") then
      log("ignoring unknown command", text)
      last_command = text
    end
  end
  return true
end

local function owner_alive()
  if not owner_pid then
    return true
  end
  local f = io.open("/proc/" .. owner_pid .. "/stat", "r")
  if f then
    f:close()
    return true
  end
  return false
end

local function main()
  if not open_listener() then
    os.exit(1)
  end
  write_atomically(control_file .. ".port", tostring(listen_port) .. "\n")
  local next_control, next_owner = 0, 0
  while true do
    local now = socket.gettime()
    if now >= next_control then
      if not check_control() then
        break
      end
      next_control = now + CONTROL_INTERVAL
    end
    if now >= next_owner then
      if not owner_alive() then
        break
      end
      next_owner = now + OWNER_INTERVAL
    end

    local readers, writers = {}, {}
    if mode == "pass" then
      if listener then
        readers[#readers + 1] = listener
      end
      for sock, side in pairs(sides) do
        if not side.eof and #side.peer.out < BUFFER_LIMIT then
          readers[#readers + 1] = sock
        end
        if #side.out > 0 then
          writers[#writers + 1] = sock
        end
      end
    end
    local readable, writable = socket.select(readers, writers, CONTROL_INTERVAL)
    for _, sock in ipairs(writable) do
      local side = sides[sock]
      if side then
        write_side(side)
      end
    end
    for _, sock in ipairs(readable) do
      if sock == listener then
        accept_one()
      elseif sides[sock] then
        read_side(sides[sock])
      end
    end
    reap_finished()
  end
  close_all()
  if listener then
    listener:close()
  end
end

main()
