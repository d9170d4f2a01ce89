-- spec/support/httpserver.lua: a real local HTTP(S) server for the specs of warren.http.
--
--   local httpserver = require "support.httpserver"
--   local srv = httpserver.start()                 -- plain HTTP on a free loopback port
--   local srv = httpserver.start({ tls = certs })  -- HTTPS with certs.server (support.tls)
--   srv.base        "http://127.0.0.1:PORT" (https://localhost:PORT with tls)
--   srv.files       the directory its /files/NAME serves and stores
--   srv:events()    the lines of its event log: "request METHOD PATH", "done PATH", "aborted PATH"
--   srv:saw(pattern) -> true when an event line matches the Lua pattern
--
-- The server is spec/support/httpserver.py (Python 3, standard library only): see its header
-- for the paths it answers. It dies with the spec's other processes.
local H = require "support.helper"

local M = {}

local Server = {}
Server.__index = Server

function M.start(opts)
  opts = opts or {}
  local dir = H.tmpdir()
  local argv = { "python3", H.source_dir .. "/spec/support/httpserver.py", dir }
  if opts.tls then
    argv[#argv + 1] = "--tls"
    argv[#argv + 1] = opts.tls.server
    argv[#argv + 1] = opts.tls.server_key
  end
  local proc = H.spawn(argv)
  local port = H.wait_until(function()
    local text = H.read_file(dir .. "/port")
    return text and tonumber(text)
  end, 10, "the HTTP server's port")
  return setmetatable({
    proc = proc,
    dir = dir,
    files = dir .. "/files",
    port = port,
    base = (opts.tls and "https://localhost:" or "http://127.0.0.1:") .. port,
  }, Server)
end

function Server:events()
  local out = {}
  for line in (H.read_file(self.dir .. "/events") or ""):gmatch("[^\n]+") do
    out[#out + 1] = line
  end
  return out
end

function Server:saw(pattern)
  for _, line in ipairs(self:events()) do
    if line:match(pattern) then return true end
  end
  return false
end

function Server:stop()
  self.proc:signal("KILL")
end

return M
