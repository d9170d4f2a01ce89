-- spec/support/helper.lua: what the end-to-end specs of warren share.
--
--   local H = require "support.helper"     -- with "spec/?.lua" in package.path
--
-- Environment:
--   WARREN_TEST_URL     the test broker, e.g. amqp://guest:guest@127.0.0.1:25672/
--   WARREN_BIN          the warren executable (H.start, H.run)
--   WTOOL_BIN           the wtool executable; when unset, spec/support/wtool.c is compiled once
--   WARREN_SOURCE_DIR   the repository root (for scripts/broker); default "."
--   WARREN_BUILD_DIR    the build directory WARREN_BIN comes from (scripts/package); default
--                       WARREN_SOURCE_DIR/build
--   WARREN_BROKER_DIR   state directory of the test broker, used by scripts/broker
--   WARREN_TEST_LUA     Lua interpreter for helper processes (tcpproxy); default "lua5.4"
--   WARREN_KEEP_TMP     when set, the temporary files are kept (their root is H.tmp_root())
--   WARREN_EMULATOR     the program that runs a warren built for another architecture (qemu-user);
--                       WARREN_BIN is then a wrapper that uses it. For specs that run another
--                       copy of warren, the packaged one: H.emulated(path)
--   WARREN_TEST_SLOW    how many times slower than native the warren under test may be (a
--                       foreign binary under qemu-user, say): H.slow, default 1. The specs that
--                       bound how long warren takes multiply the bound by it.
--
-- Conventions: every failure raises a Lua error whose message says what was being done and
-- includes the relevant output, so that a failing spec explains itself. Timeouts are seconds
-- (fractions allowed). Processes started here are killed, and temporary files removed, when
-- the helper is garbage collected or Lua exits; processes also die within about a second of
-- the test process disappearing, even when it is killed.
local socket = require "socket"

local H = {}

local function getenv(name)
  local v = os.getenv(name)
  if v == "" then
    return nil
  end
  return v
end

H.url = getenv("WARREN_TEST_URL")
H.warren_bin = getenv("WARREN_BIN")
H.source_dir = getenv("WARREN_SOURCE_DIR") or "."
H.build_dir = getenv("WARREN_BUILD_DIR") or H.source_dir .. "/build"
H.broker_dir = getenv("WARREN_BROKER_DIR")
H.lua_bin = getenv("WARREN_TEST_LUA") or "lua5.4"
H.emulator = getenv("WARREN_EMULATOR")
H.slow = tonumber(getenv("WARREN_TEST_SLOW") or "1")
assert(H.slow and H.slow >= 1, "WARREN_TEST_SLOW must be a number, 1 or more")

-- Environment variables that configure warren (DESIGN.md: WARREN_ + option name). H.start and
-- H.run remove them from the child's environment so that a developer's shell cannot change
-- what a spec tests; pass them explicitly in opts.env when a spec wants them.
H.WARREN_OPTION_VARS = {
  "WARREN_URL", "WARREN_QUEUE", "WARREN_PREFETCH", "WARREN_DRAIN_TIMEOUT", "WARREN_HEARTBEAT",
  "WARREN_DECLARE", "WARREN_LOG_LEVEL", "WARREN_WATCH", "WARREN_NO_WATCH",
  "WARREN_MAX_RETRIES", "WARREN_ON_ERROR", "WARREN_JOB_TIMEOUT", "WARREN_MEMORY_LIMIT",
  "WARREN_CONNECT_TIMEOUT", "WARREN_METRICS", "WARREN_LOG_FORMAT", "JOURNAL_STREAM",
  "WARREN_MAX_JOBS", "WARREN_UNTIL_EMPTY", "WARREN_REPORT", "WARREN_VIRTUAL_TIME",
  "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
}

---------------------------------------------------------------------------- basics

-- H.now() -> wall-clock seconds as a float (microsecond resolution).
function H.now()
  return socket.gettime()
end

-- H.sleep(seconds)
function H.sleep(seconds)
  socket.sleep(seconds)
end

-- H.free_port() -> a loopback TCP port nobody listens on right now.
function H.free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- H.sample(text, series) -> the value of the sample "name{labels}" (labels exactly as served)
-- in a metrics text, or nil.
function H.sample(text, series)
  local escaped = series:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?{}]", "%%%0")
  return tonumber(("\n" .. text):match("\n" .. escaped .. " (%S+)"))
end

-- H.quote(s) -> s quoted for /bin/sh (a single word, whatever bytes it holds except NUL).
function H.quote(s)
  s = tostring(s)
  if s:match("^[%w%.,_/:=@%%+-]+$") then
    return s
  end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end
local q = H.quote

-- H.lua_string(s) -> a Lua literal for s (binary-safe), for generating script sources.
function H.lua_string(s)
  return string.format("%q", s)
end

-- H.read_file(path) -> the whole file (binary), or nil if it cannot be opened.
function H.read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local text = f:read("a")
  f:close()
  return text
end

-- H.write_file(path, text): replaces the file's content in place (same inode).
function H.write_file(path, text)
  local f = assert(io.open(path, "wb"))
  assert(f:write(text))
  assert(f:close())
end

-- H.emulated(path) -> the shell words that run the warren binary at path: under H.emulator
-- when there is one.
function H.emulated(path)
  if H.emulator then
    return q(H.emulator) .. " " .. q(path)
  end
  return q(path)
end

-- Runs a shell command line; returns its exit code (128 + N when killed by signal N).
local function execute(cmd)
  local _, how, n = os.execute(cmd)
  if how == "signal" then
    return 128 + n
  end
  return n
end

-- H.wait_until(fn, timeout, what) -> fn's first truthy result, polling every 20 ms.
-- Raises "timed out after Ts waiting for WHAT" if it never comes (default timeout 10 s).
function H.wait_until(fn, timeout, what)
  local deadline = H.now() + (timeout or 10)
  while true do
    local v = fn()
    if v then
      return v
    end
    if H.now() >= deadline then
      local msg = "timed out after %gs waiting for %s"
      error(string.format(msg, timeout or 10, what or "a condition"), 2)
    end
    socket.sleep(0.02)
  end
end

---------------------------------------------------------------------------- temporary files

local tmp_root = nil
local tmp_count = 0
local children = {} -- every process started, for the final cleanup

-- H.tmp_root() -> the directory under which every temporary file of this run lives.
function H.tmp_root()
  if not tmp_root then
    local p = io.popen('mktemp -d "${TMPDIR:-/tmp}/warren-spec.XXXXXX"')
    tmp_root = p:read("l")
    p:close()
    assert(tmp_root and tmp_root ~= "", "mktemp -d failed")
  end
  return tmp_root
end

-- H.tmpdir() -> a fresh, empty directory.
function H.tmpdir()
  tmp_count = tmp_count + 1
  local dir = string.format("%s/%d", H.tmp_root(), tmp_count)
  assert(execute("mkdir " .. q(dir)) == 0, "cannot create " .. dir)
  return dir
end

-- H.script(source_text [, filename]) -> path of a new file FILENAME (default "job.lua") holding
-- source_text, in its own fresh directory. Rewrite it with H.write_file to test reloads.
function H.script(source, filename)
  local path = H.tmpdir() .. "/" .. (filename or "job.lua")
  H.write_file(path, source)
  return path
end

-- The process running this Lua: the parent of the shell that io.popen starts.
local owner_pid = nil
local function get_owner_pid()
  if not owner_pid then
    local p = io.popen("echo $PPID")
    owner_pid = p:read("l")
    p:close()
  end
  return owner_pid
end

local cleanups = {} -- functions registered with H.on_cleanup, by key

-- H.on_cleanup(key, fn): fn runs at cleanup (see below) unless H.on_cleanup(key, nil) takes it
-- back first; for resources that are not child processes, such as broker nodes.
function H.on_cleanup(key, fn)
  cleanups[key] = fn
end

-- At collection of this module (and so at Lua exit): kill leftover processes, run the
-- registered cleanups, remove files.
H._cleanup = setmetatable({}, {
  __gc = function()
    for _, proc in ipairs(children) do
      if not H.read_file(proc.rc_path) then
        execute("kill -KILL " .. proc.pid .. " 2>/dev/null")
      end
    end
    for key, fn in pairs(cleanups) do
      cleanups[key] = nil
      pcall(fn)
    end
    if tmp_root and not getenv("WARREN_KEEP_TMP") then
      execute("rm -rf " .. q(tmp_root))
    end
  end,
})

---------------------------------------------------------------------------- records

-- Record files let a script under test report what it did. The spec passes a fresh path in the
-- environment variable H.RECORD_ENV and prepends H.RECORD_LUA to the script source:
--
--   local rec = H.record_file()
--   local path = H.script(H.RECORD_LUA .. [[
--   function handle(body, msg)
--     record("start", msg.message_id, now())
--     ...
--   end]])
--   local proc = H.start(path, {...}, {env = {[H.RECORD_ENV] = rec}})
--   ... H.records(rec) -> {{"start", "m1", "1700000000.123456", line = "..."}, ...}
--
-- H.RECORD_LUA is a single line without a newline, so the script's own line numbers are
-- unchanged. It defines two locals: record(...) appends one line, its arguments joined by
-- spaces (floats with 6 decimals), opening and closing the file each time so that every line
-- is complete as soon as record returns; now() is wall-clock seconds (luasocket's gettime
-- when the script can load it, else os.time).
H.RECORD_ENV = "WARREN_TEST_RECORD"
H.RECORD_LUA = "local record, now; do "
  .. "local ok, s = pcall(require, 'socket'); "
  .. "local clock = ok and type(s) == 'table' and s.gettime or os.time; "
  .. "now = function() return clock() end; "
  .. "record = function(...) "
  .. "local t = table.pack(...); "
  .. "for i = 1, t.n do local v = t[i]; "
  .. "t[i] = math.type(v) == 'float' and string.format('%.6f', v) or tostring(v) end; "
  .. "local f = assert(io.open(assert(os.getenv('WARREN_TEST_RECORD'), "
  .. "'WARREN_TEST_RECORD is not set'), 'a')); "
  .. "f:write(table.concat(t, ' ', 1, t.n), '\\n'); f:close() end end; "

-- H.TICKER_LUA: a job script whose handle records "tick ID TIME" every 10 ms of sleep for
-- BODY seconds, then "end ID": the gaps between ticks show how long the loop was held.
H.TICKER_LUA = H.RECORD_LUA .. [[
  local warren = require "warren"
  function handle(body, msg)
    local stop = now() + tonumber(body)
    while now() < stop do
      record("tick", msg.message_id, now())
      warren.sleep(0.01)
    end
    record("end", msg.message_id)
  end]]

-- H.largest_gap(rec) -> how many ticks the record file holds and the longest time between two.
function H.largest_gap(rec)
  local last, worst, ticks = nil, 0, 0
  for _, r in ipairs(H.records(rec)) do
    if r[1] == "tick" then
      local t = tonumber(r[3])
      if last then worst = math.max(worst, t - last) end
      last, ticks = t, ticks + 1
    end
  end
  return ticks, worst
end

-- H.kinds(path) -> "KIND FIELD3" for each record of the file, in order ("KIND " when it has
-- no third field): what the jobs did, in short, e.g. {"start false", "closed "}.
function H.kinds(path)
  local out = {}
  for _, r in ipairs(H.records(path)) do out[#out + 1] = r[1] .. " " .. (r[3] or "") end
  return out
end

-- H.record_file() -> a fresh path for a record file (not created yet).
function H.record_file()
  return H.tmpdir() .. "/records"
end

-- H.records(path) -> array of records, one per complete line (a line still being written is
-- left out): the line's whitespace-separated fields as strings, plus .line (the whole line).
-- A missing file gives {}.
function H.records(path)
  local text = H.read_file(path) or ""
  local out = {}
  for line in text:gmatch("([^\n]*)\n") do
    local fields = { line = line }
    for field in line:gmatch("%S+") do
      fields[#fields + 1] = field
    end
    out[#out + 1] = fields
  end
  return out
end

---------------------------------------------------------------------------- processes

-- Appends NAME=VALUE shell words for the table env to words, sorted by name; returns words.
local function env_words(words, env)
  local names = {}
  for name in pairs(env or {}) do
    names[#names + 1] = name
  end
  table.sort(names)
  for _, name in ipairs(names) do
    words[#words + 1] = q(name .. "=" .. tostring(env[name]))
  end
  return words
end

local Proc = {}
Proc.__index = Proc

-- H.spawn(argv, opts) -> proc. Starts argv (program and arguments, not interpreted by a shell)
-- in the background with stdin from /dev/null and stdout+stderr to proc.log_path.
-- opts.env: table of variables added to the environment; opts.unset: list of variables
-- removed from it. The process is killed within about a second if this Lua process goes away.
-- NB: /bin/sh starts background jobs with SIGINT and SIGQUIT ignored; a program that wants
-- them must install its own handlers (warren does).
function H.spawn(argv, opts)
  opts = opts or {}
  local dir = H.tmpdir()
  local proc = setmetatable({
    argv = argv,
    dir = dir,
    log_path = dir .. "/log",
    pid_path = dir .. "/pid",
    rc_path = dir .. "/rc",
  }, Proc)

  local words = { "env" }
  for _, name in ipairs(opts.unset or {}) do
    words[#words + 1] = "-u " .. q(name)
  end
  env_words(words, opts.env)
  for _, a in ipairs(argv) do
    words[#words + 1] = q(a)
  end

  -- The wrapper shell records the pid, kills the child if the owner (this Lua) disappears,
  -- and records the exit status; pid and rc files are renamed into place, so never partial.
  local wrapper = table.concat({
    table.concat(words, " ") .. " >" .. q(proc.log_path) .. " 2>&1 </dev/null &",
    "pid=$!",
    "echo $pid >" .. q(proc.pid_path .. ".tmp"),
    "mv " .. q(proc.pid_path .. ".tmp") .. " " .. q(proc.pid_path),
    "(while kill -0 $pid 2>/dev/null; do kill -0 " .. get_owner_pid()
      .. " 2>/dev/null || kill -KILL $pid 2>/dev/null; sleep 1; done) &",
    "wait $pid",
    "echo $? >" .. q(proc.rc_path .. ".tmp"),
    "mv " .. q(proc.rc_path .. ".tmp") .. " " .. q(proc.rc_path),
  }, "\n")
  local rc = execute("sh -c " .. q(wrapper) .. " </dev/null >/dev/null 2>&1 &")
  assert(rc == 0, "cannot start a shell for " .. table.concat(argv, " "))

  local pid = H.wait_until(function()
    local text = H.read_file(proc.pid_path)
    return text and tonumber(text)
  end, 10, "the pid of " .. table.concat(argv, " "))
  proc.pid = pid
  children[#children + 1] = proc
  return proc
end

-- proc:signal(name) -> true if sent. name: "TERM", "INT", "HUP", "KILL", ... or a number.
function Proc:signal(name)
  name = tostring(name):gsub("^SIG", "")
  return execute("kill -" .. name .. " " .. self.pid .. " 2>/dev/null") == 0
end

-- proc:exit_code() -> the exit code if the process has ended (128 + N if killed by signal N),
-- else nil. Never waits.
function Proc:exit_code()
  if self.code == nil then
    local text = H.read_file(self.rc_path)
    self.code = text and tonumber(text)
  end
  return self.code
end

-- proc:running() -> true until the process has ended and been reaped.
function Proc:running()
  return self:exit_code() == nil
end

-- proc:wait(timeout) -> exit code (as exit_code), or nil if still running after timeout
-- seconds (default 10).
function Proc:wait(timeout)
  local deadline = H.now() + (timeout or 10)
  while true do
    local code = self:exit_code()
    if code or H.now() >= deadline then
      return code
    end
    socket.sleep(0.02)
  end
end

-- proc:log() -> everything the process has written to stdout and stderr so far.
function Proc:log()
  return H.read_file(self.log_path) or ""
end

-- proc:mark() -> the current length of the log, to pass as `from` to wait_log so that only
-- output written after this point matches.
function Proc:mark()
  return #self:log()
end

-- proc:wait_log(pattern, timeout, from) -> true once the log (after byte offset `from`,
-- default 0) matches the Lua pattern. Raises an error that shows the log if the process
-- exits first or timeout seconds (default 10) pass.
function Proc:wait_log(pattern, timeout, from)
  timeout = timeout or 10
  local deadline = H.now() + timeout
  while true do
    local ended = self:exit_code() -- before reading: an ended process has written its all
    local log = self:log()
    if log:find(pattern, (from or 0) + 1) then
      return true
    end
    local why = nil
    if ended then
      why = "the process exited with code " .. ended
    elseif H.now() >= deadline then
      why = string.format("timed out after %gs", timeout)
    end
    if why then
      error(string.format("%s waiting for %q in the log of %s:\n%s", why, pattern,
        table.concat(self.argv, " "), log), 2)
    end
    socket.sleep(0.02)
  end
end

-- proc:stop() -> exit code. Kills the process (SIGKILL) if it still runs and waits for it;
-- safe to call at any time, any number of times (meant for after_each).
function Proc:stop()
  if self.pid and self:running() then
    self:signal("KILL")
    return self:wait(10)
  end
  return self:exit_code()
end

-- Shell words for running warren: environment cleaned as for H.start, then argv.
local function warren_command(args, env)
  assert(H.warren_bin, "WARREN_BIN is not set")
  local words = { "env" }
  for _, name in ipairs(H.WARREN_OPTION_VARS) do
    words[#words + 1] = "-u " .. name
  end
  env_words(words, env)
  words[#words + 1] = q(H.warren_bin)
  for _, a in ipairs(args) do
    words[#words + 1] = q(a)
  end
  return table.concat(words, " ")
end

-- H.start(script_path, args, opts) -> proc. Starts `WARREN_BIN args... script_path` in the
-- background (see H.spawn for proc and opts.env); the WARREN_* option variables are removed
-- from its environment (H.WARREN_OPTION_VARS). script_path may be nil.
--   local proc = H.start(path, {"--url", H.url, "--queue", q, "--prefetch", 4})
function H.start(script_path, args, opts)
  assert(H.warren_bin, "WARREN_BIN is not set")
  opts = opts or {}
  local argv = { H.warren_bin }
  for _, a in ipairs(args or {}) do
    argv[#argv + 1] = tostring(a)
  end
  argv[#argv + 1] = script_path
  return H.spawn(argv, { env = opts.env, unset = H.WARREN_OPTION_VARS })
end

-- H.worker(script, queue, args, env, url) -> proc. Starts warren on queue (at url, default
-- H.url) with the extra args and env, and returns once the broker shows its consumer; raises
-- an error with the log if warren exits first.
function H.worker(script, queue, args, env, url)
  local argv = { "--url", url or H.url, "--queue", queue }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local proc = H.start(script, argv, { env = env })
  H.wait_until(function()
    local _, consumers = H.depth(queue)
    return consumers == 1 or not proc:running()
  end, 10, "warren consuming " .. queue)
  assert(proc:running(), "warren exited at start:\n" .. proc:log())
  return proc
end

-- H.force(proc) -> seconds from the second signal to the exit. Forces exit the way an operator
-- does: SIGTERM, a wait for the drain's log line, SIGTERM again; raises unless warren then
-- exits with 75 within 5 s.
function H.force(proc)
  local mark = proc:mark()
  proc:signal("TERM")
  proc:wait_log("a second signal forces exit", 5, mark)
  local t0 = H.now()
  proc:signal("TERM")
  local code = proc:wait(5)
  assert(code == 75, "forced exit gave " .. tostring(code) .. ":\n" .. proc:log())
  return H.now() - t0
end

-- H.term(proc) -> exit code: SIGTERM, then waits up to 10 s for the exit.
function H.term(proc)
  proc:signal("TERM")
  return proc:wait(10)
end

-- H.stop_all(): kills every process started so far that still runs; for after_each, so a
-- failed test leaves no worker consuming behind it.
function H.stop_all()
  for _, proc in ipairs(children) do proc:stop() end
end

-- H.run(args, opts) -> exit_code, output. Runs `WARREN_BIN args...` to completion, e.g.
-- H.run({"check", path}). output is stdout and stderr interleaved; with opts.split it returns
-- exit_code, stdout, stderr instead. opts.stdin: a string fed to stdin (default /dev/null);
-- opts.env: variables added; opts.timeout: seconds (default 10) after which it is killed
-- and the exit code is 124 (137 if it ignored SIGTERM).
function H.run(args, opts)
  opts = opts or {}
  local dir = H.tmpdir()
  local stdin = "/dev/null"
  if opts.stdin then
    stdin = dir .. "/stdin"
    H.write_file(stdin, opts.stdin)
  end
  local argv = {}
  for i, a in ipairs(args or {}) do
    argv[i] = tostring(a)
  end
  local cmd = string.format("timeout -k 2 %g %s <%s", opts.timeout or 10,
    warren_command(argv, opts.env), q(stdin))
  local out, err = dir .. "/stdout", dir .. "/stderr"
  if opts.split then
    cmd = cmd .. " >" .. q(out) .. " 2>" .. q(err)
  else
    cmd = cmd .. " >" .. q(out) .. " 2>&1"
  end
  local code = execute(cmd)
  if opts.split then
    return code, H.read_file(out) or "", H.read_file(err) or ""
  end
  return code, H.read_file(out) or ""
end

---------------------------------------------------------------------------- broker: wtool

local support_dir = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".")
if not support_dir:match("^/") then
  local p = io.popen("pwd")
  support_dir = p:read("l") .. "/" .. support_dir
  p:close()
end
H.support_dir = support_dir

local wtool_bin = getenv("WTOOL_BIN")

-- H.wtool_bin() -> path of wtool: WTOOL_BIN, else spec/support/wtool.c compiled once.
function H.wtool_bin()
  if not wtool_bin then
    local bin = H.tmpdir() .. "/wtool"
    local cmd = string.format("cc -std=c11 -O2 -o %s %s -lrabbitmq 2>&1", q(bin),
      q(support_dir .. "/wtool.c"))
    local p = io.popen(cmd)
    local out = p:read("a")
    local ok = p:close()
    assert(ok, "WTOOL_BIN is not set and compiling wtool.c failed:\n" .. out)
    wtool_bin = bin
  end
  return wtool_bin
end

-- Runs the shell words followed by args (quoted) with stdin from /dev/null, stdout and stderr to
-- files in dir; -> exit_code, stdout, stderr.
local function run_words(words, args, dir)
  for _, a in ipairs(args) do
    words[#words + 1] = q(tostring(a))
  end
  local out, err = dir .. "/stdout", dir .. "/stderr"
  local code = execute(table.concat(words, " ") .. " </dev/null >" .. q(out) .. " 2>" .. q(err))
  return code, H.read_file(out) or "", H.read_file(err) or ""
end

-- H.wtool(args, env) -> exit_code, stdout, stderr. Runs wtool with args (a list) and the test
-- broker (--url H.url unless args has its own --url, which then wins). env: optional table of
-- variables added to wtool's environment, e.g. {WARREN_TEST_CACERT = path} for amqps URLs.
function H.wtool(args, env)
  local dir = H.tmpdir()
  local words = env_words({ "env" }, env)
  words[#words + 1] = q(H.wtool_bin())
  if H.url then
    words[#words + 1] = "--url " .. q(H.url)
  end
  return run_words(words, args, dir)
end

-- Runs wtool and returns its stdout; raises an error with its stderr unless it exits 0.
local function wtool_ok(args)
  assert(H.url, "WARREN_TEST_URL is not set")
  local code, out, err = H.wtool(args)
  if code ~= 0 then
    error(string.format("wtool %s: exit %d: %s", table.concat(args, " "), code, err), 3)
  end
  return out
end

local queue_count = 0

-- H.unique_name(prefix) -> a name no other run or call has produced (prefix, time, random).
function H.unique_name(prefix)
  queue_count = queue_count + 1
  return string.format("%s-%d-%06x-%d", prefix or "q", os.time(), math.random(0, 0xffffff),
    queue_count)
end

-- H.queue(prefix, opts) -> name [, dlq]. Declares a new durable queue with a unique name.
-- With opts.dead_letter, also declares name..".dlq" (a classic queue) and makes it the queue's
-- dead-letter queue (via the default exchange); it is returned as the second value.
-- opts.quorum makes it a quorum queue, with opts.delivery_limit (x-delivery-limit) and
-- opts.single_active (x-single-active-consumer) if given.
function H.queue(prefix, opts)
  opts = opts or {}
  local name = H.unique_name(prefix)
  local args = { "declare", name, "--fresh" }
  local dlq = nil
  if opts.dead_letter then
    dlq = name .. ".dlq"
    args[#args + 1] = "--dead-letter"
    args[#args + 1] = dlq
  end
  if opts.quorum then
    args[#args + 1] = "--quorum"
  end
  if opts.delivery_limit then
    args[#args + 1] = "--delivery-limit"
    args[#args + 1] = opts.delivery_limit
  end
  if opts.single_active then
    args[#args + 1] = "--single-active"
  end
  wtool_ok(args)
  return name, dlq
end

-- H.delete_queue(name)
function H.delete_queue(name)
  wtool_ok({ "delete", name })
end

-- H.publish(queue, n, opts) -> ids, the list {PREFIX.."1", ..., PREFIX..n}. Publishes n
-- persistent messages with those message ids to the queue (default exchange) and waits for the
-- broker's confirms. opts.prefix (default "m"); the body, the same for all: opts.body (any
-- bytes), opts.body_file (a path), or opts.body_size (bytes i*31 % 256 for i = 0..size-1,
-- see H.body_bytes); default empty. opts.headers: table of string headers. opts.expiration:
-- per-message TTL in milliseconds.
function H.publish(queue, n, opts)
  opts = opts or {}
  local prefix = opts.prefix or "m"
  local args = { "publish", queue, "--count", n, "--prefix", prefix }
  if opts.body ~= nil then
    if opts.body:find("\0", 1, true) then -- argv cannot carry NUL bytes
      local path = H.tmpdir() .. "/body"
      H.write_file(path, opts.body)
      args[#args + 1] = "--body-file"
      args[#args + 1] = path
    else
      args[#args + 1] = "--body"
      args[#args + 1] = opts.body
    end
  elseif opts.body_file then
    args[#args + 1] = "--body-file"
    args[#args + 1] = opts.body_file
  elseif opts.body_size then
    args[#args + 1] = "--body-size"
    args[#args + 1] = opts.body_size
  end
  local keys = {}
  for k in pairs(opts.headers or {}) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    args[#args + 1] = "--header"
    args[#args + 1] = k .. "=" .. tostring(opts.headers[k])
  end
  if opts.expiration then
    args[#args + 1] = "--expiration"
    args[#args + 1] = opts.expiration
  end
  wtool_ok(args)
  local ids = {}
  for i = 1, n do
    ids[i] = prefix .. i
  end
  return ids
end

-- H.body_bytes(size) -> the body that publish's opts.body_size produces.
function H.body_bytes(size)
  local parts = {}
  for i = 0, size - 1 do
    parts[#parts + 1] = string.char(i * 31 % 256)
  end
  return table.concat(parts)
end

-- H.depth(queue) -> ready, consumers (numbers). Raises if the queue does not exist.
function H.depth(queue)
  local out = wtool_ok({ "depth", queue })
  local ready, consumers = out:match("^(%d+) (%d+)")
  assert(ready, "wtool depth printed: " .. out)
  return tonumber(ready), tonumber(consumers)
end

-- H.drain(queue, opts) -> array of {id=, redelivered=bool, len=, deaths=} in queue order.
-- Takes and acks every ready message (at most opts.max). id is "-" for a message without
-- message id; deaths is the count of the first x-death entry (0 if never dead-lettered).
function H.drain(queue, opts)
  local args = { "drain", queue }
  if opts and opts.max then
    args[#args + 1] = "--max"
    args[#args + 1] = opts.max
  end
  local out = wtool_ok(args)
  local list = {}
  for id, redelivered, len, deaths in out:gmatch("(%S+) (%d) (%d+) (%d+)\n") do
    list[#list + 1] = {
      id = id,
      redelivered = redelivered == "1",
      len = tonumber(len),
      deaths = tonumber(deaths),
    }
  end
  return list
end

-- H.ids(list) -> the .id fields of a list of drained messages (or of records' field 2 if
-- given records), sorted, for comparing with publish's result: assert.same(H.sorted(ids), ...).
function H.ids(list)
  local ids = {}
  for i, m in ipairs(list) do
    ids[i] = m.id or m[2]
  end
  return H.sorted(ids)
end

-- H.sorted(list) -> a sorted copy; ids with the same prefix sort by their number.
function H.sorted(list)
  local copy = table.move(list, 1, #list, 1, {})
  table.sort(copy, function(a, b)
    local pa, na = tostring(a):match("^(.-)(%d+)$")
    local pb, nb = tostring(b):match("^(.-)(%d+)$")
    if pa and pb and pa == pb then
      return tonumber(na) < tonumber(nb)
    end
    return tostring(a) < tostring(b)
  end)
  return copy
end

-- H.get_body(queue) -> the body of the next ready message (acked), or nil if there is none.
function H.get_body(queue)
  assert(H.url, "WARREN_TEST_URL is not set")
  local code, out, err = H.wtool({ "get", queue })
  if code == 2 then
    return nil
  end
  if code ~= 0 then
    error(string.format("wtool get %s: exit %d: %s", queue, code, err), 2)
  end
  return out
end

-- H.ctl(...) -> ok, output. Runs `WARREN_SOURCE_DIR/scripts/broker ctl ...` (rabbitmqctl for
-- the test broker), e.g. H.ctl("list_queues", "name", "messages").
function H.ctl(...)
  local words = { q(H.source_dir .. "/scripts/broker"), "ctl" }
  for _, a in ipairs({ ... }) do
    words[#words + 1] = q(a)
  end
  local p = io.popen(table.concat(words, " ") .. " </dev/null 2>&1")
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

---------------------------------------------------------------------------- private brokers

-- H.broker_script(dir, args, env) -> exit_code, stdout, stderr. Runs scripts/broker args... with
-- WARREN_BROKER_DIR=dir and the variables of the table env added to its environment.
function H.broker_script(dir, args, env)
  local all = { WARREN_BROKER_DIR = dir }
  for name, value in pairs(env or {}) do
    all[name] = value
  end
  local words = env_words({ "env" }, all)
  words[#words + 1] = q(H.source_dir .. "/scripts/broker")
  return run_words(words, args, H.tmpdir())
end

local function append(list, more)
  local all = table.move(list, 1, #list, 1, {})
  return table.move(more, 1, #more, #all + 1, all)
end

-- A node is not a child process: if this Lua process is killed (a ctest timeout, say), nothing
-- else stops it. The watchdog started here, in a session of its own, runs
-- `scripts/broker STOP_ARGS...` for dir once this process is gone, unless the returned release
-- function was called first (it is, by every normal stop).
local function broker_watchdog(dir, stop_args)
  local released = dir .. "/.watchdog-released"
  local stop = env_words({ "env" }, { WARREN_BROKER_DIR = dir })
  stop[#stop + 1] = q(H.source_dir .. "/scripts/broker")
  for _, a in ipairs(stop_args) do
    stop[#stop + 1] = q(a)
  end
  local script = string.format(
    "while kill -0 %s 2>/dev/null && [ ! -e %s ]; do sleep 1; done; [ -e %s ] || exec %s",
    get_owner_pid(), q(released), q(released), table.concat(stop, " "))
  local rc = execute("setsid sh -c " .. q(script) .. " </dev/null >/dev/null 2>&1 &")
  assert(rc == 0, "cannot start the watchdog of the broker in " .. dir)
  return function()
    H.write_file(released, "")
  end
end

local Private = {}
Private.__index = Private

-- Runs `scripts/broker PREFIX... start` in a fresh directory with env; -> the object, whose
-- stop() runs `scripts/broker PREFIX... stop` (also at cleanup, and by a watchdog if this
-- process dies), and start's stdout. Raises with start's output, after stopping, if it fails.
local function start_private(prefix, env, class)
  local dir = H.tmpdir()
  local self = setmetatable({ dir = dir, prefix = prefix }, class)
  self.release = broker_watchdog(dir, append(prefix, { "stop" }))
  H.on_cleanup(self, function() self:stop() end)
  local code, out, err = H.broker_script(dir, append(prefix, { "start" }), env)
  if code ~= 0 then
    pcall(self.stop, self)
    error(string.format("scripts/broker %s start in %s: exit %d:\n%s%s",
      table.concat(prefix, " "), dir, code, out, err), 3)
  end
  return self, out
end

-- Runs scripts/broker PREFIX... args... for this node or cluster; -> exit_code, stdout, stderr.
function Private:script(...)
  return H.broker_script(self.dir, append(self.prefix, { ... }))
end

-- Stops the node (or every member of the cluster). Safe to call any number of times.
function Private:stop()
  if self.stopped then
    return
  end
  self.stopped = true
  local code, out, err = self:script("stop")
  self.release()
  H.on_cleanup(self, nil)
  if code ~= 0 then
    error(string.format("scripts/broker stop in %s: exit %d:\n%s%s", self.dir, code, out, err), 2)
  end
end

local Node = setmetatable({}, { __index = Private })
Node.__index = Node

-- H.broker_node(env) -> node. A private RabbitMQ node besides the test broker, for specs that
-- need one of their own (TLS, other configuration): scripts/broker start with
-- WARREN_BROKER_DIR a fresh directory and the variables of env (WARREN_BROKER_TLS,
-- WARREN_BROKER_CONF, ...). node.url: its AMQP URL; node.dir: its directory;
-- node:ctl(...) -> ok, output (rabbitmqctl against it); node:stop() (any number of times; also
-- at cleanup, and if this process dies). Starting takes about 5 s on an idle machine.
function H.broker_node(env)
  local node, out = start_private({}, env, Node)
  node.url = out:match("^(%S+)")
  return node
end

-- Joins stdout and stderr for ctl's "ok, output".
local function ctl_result(code, out, err)
  return code == 0, out .. err
end

function Node:ctl(...)
  return ctl_result(self:script("ctl", ...))
end

local Cluster = setmetatable({}, { __index = Private })
Cluster.__index = Cluster

-- H.cluster(env) -> cluster. Three clustered RabbitMQ nodes (scripts/broker cluster start in a
-- fresh directory, with the variables of env, e.g. WARREN_BROKER_CONF). cluster.urls: the
-- members' AMQP URLs, member 1 first; cluster.names: their node names; cluster.dir.
--   cluster:ctl(n, ...) -> ok, output     rabbitmqctl against member n
--   cluster:stop_node(n)                  stop member n (raises if that fails)
--   cluster:start_node(n) -> url          start it again; it rejoins (URL kept if its port is free)
--   cluster:stop()                        stop every member (as node:stop())
-- Starting takes 20-30 s on this project's two-core machines.
function H.cluster(env)
  local cluster, out = start_private({ "cluster" }, env, Cluster)
  cluster.urls, cluster.names = {}, {}
  for url in out:gmatch("(%S+)\n") do
    cluster.urls[#cluster.urls + 1] = url
  end
  local id = H.read_file(cluster.dir .. "/cluster.id"):match("%x+")
  for n = 1, #cluster.urls do
    cluster.names[n] = string.format("warren-%s-%d@localhost", id, n)
  end
  return cluster
end

function Cluster:ctl(n, ...)
  return ctl_result(self:script("ctl", n, ...))
end

-- Runs a cluster command that must succeed; -> its stdout.
function Cluster:must(...)
  local code, out, err = self:script(...)
  if code ~= 0 then
    error(string.format("scripts/broker cluster %s: exit %d:\n%s%s",
      table.concat({ ... }, " "), code, out, err), 3)
  end
  return out
end

function Cluster:stop_node(n)
  self:must("stop-node", n)
end

function Cluster:start_node(n)
  self.urls[n] = self:must("start-node", n):match("^(%S+)")
  return self.urls[n]
end

-- H.pids_in(dir) -> the pids of the processes whose environment names a path in dir, as a
-- list: what is left of the broker nodes whose state is there (beam, its launcher, helpers).
-- epmd is left out: whichever node starts it passes on its environment, and it is shared by
-- every node on the machine.
function H.pids_in(dir)
  local p = io.popen("grep -lsF -- " .. q("=" .. dir .. "/") .. " /proc/[0-9]*/environ")
  local pids = {}
  for pid in p:read("a"):gmatch("/proc/(%d+)/environ") do
    local comm = H.read_file("/proc/" .. pid .. "/comm")
    if comm and comm ~= "epmd\n" then
      pids[#pids + 1] = tonumber(pid)
    end
  end
  p:close()
  return pids
end

---------------------------------------------------------------------------- network faults

local Proxy = {}
Proxy.__index = Proxy

-- Splits an AMQP URL into the parts before and after host:port, host and port.
local function split_url(url)
  local scheme, rest = url:match("^(amqps?://)(.*)$")
  assert(scheme, "not an AMQP URL: " .. tostring(url))
  local userinfo, hostport, tail = rest:match("^([^@/]*@)([^/]*)(.*)$")
  if not userinfo then
    userinfo, hostport, tail = "", rest:match("^([^/]*)(.*)$")
  end
  local host, port = hostport:match("^(.*):(%d+)$")
  if not host then
    host, port = hostport, (scheme == "amqps://" and 5671 or 5672)
  end
  if host == "" then
    host = "localhost"
  end
  return scheme .. userinfo, host, tonumber(port), tail
end

-- H.proxy(target_url) -> proxy, a TCP proxy (spec/support/tcpproxy.lua) in front of the broker
-- at target_url (default H.url). proxy.url is target_url with host:port replaced by the
-- proxy's (credentials and vhost kept); proxy.port its port. The mode methods return once
-- the proxy has applied them:
--   proxy:hold()    black hole: connections stay open, no byte passes, nothing is accepted
--   proxy:pass()    forward again (buffered bytes then flow)
--   proxy:drop()    close every current connection, then forward new ones
--   proxy:refuse()  close everything and stop listening (connection refused) until pass()
--   proxy:stop()    end the proxy (also happens at cleanup, or if the test process dies)
function H.proxy(target_url)
  target_url = target_url or assert(H.url, "WARREN_TEST_URL is not set")
  local head, host, port, tail = split_url(target_url)
  local dir = H.tmpdir()
  local control = dir .. "/control"
  H.write_file(control, "pass 0\n")
  local proc = H.spawn({
    H.lua_bin, support_dir .. "/tcpproxy.lua", "0", host, tostring(port), control, get_owner_pid(),
  })
  local listen = H.wait_until(function()
    local text = H.read_file(control .. ".port")
    if not text and not proc:running() then
      error("tcpproxy exited with code " .. tostring(proc:exit_code()) .. ":\n" .. proc:log())
    end
    return text and tonumber(text)
  end, 10, "tcpproxy to listen")
  return setmetatable({
    port = listen,
    url = head .. "127.0.0.1:" .. listen .. tail,
    proc = proc,
    control = control,
    seq = 0,
  }, Proxy)
end

-- Writes a command for the proxy and waits until it is acknowledged.
function Proxy:command(mode)
  self.seq = self.seq + 1
  local tmp = self.control .. ".tmp"
  H.write_file(tmp, mode .. " " .. self.seq .. "\n")
  assert(os.rename(tmp, self.control))
  local seq = self.seq
  H.wait_until(function()
    if not self.proc:running() then
      local proc = self.proc
      error(string.format("tcpproxy exited with code %s:\n%s", proc:exit_code(), proc:log()))
    end
    local ack = tonumber(H.read_file(self.control .. ".ack") or "")
    return ack and ack >= seq
  end, 5, "tcpproxy to apply '" .. mode .. "'")
end

function Proxy:hold()
  self:command("hold")
end

function Proxy:pass()
  self:command("pass")
end

function Proxy:drop()
  self:command("drop")
end

function Proxy:refuse()
  self:command("refuse")
end

function Proxy:stop()
  if self.proc:running() then
    self.proc:signal("TERM")
    if not self.proc:wait(5) then
      self.proc:stop()
    end
  end
end

-- H.fakebroker(scenario) -> fake, a fake AMQP broker (spec/support/fakebroker.lua) that
-- breaks the protocol in the given way on the first consuming connection. fake.url is its
-- AMQP URL; fake:records() returns its record lines as arrays of words (see the file).
function H.fakebroker(scenario)
  local dir = H.tmpdir()
  local port_file, rec = dir .. "/port", dir .. "/records"
  local proc = H.spawn({
    H.lua_bin, support_dir .. "/fakebroker.lua", port_file, rec, scenario, get_owner_pid(),
  })
  local port = H.wait_until(function()
    local text = H.read_file(port_file)
    if not text and not proc:running() then
      error("fakebroker exited with code " .. tostring(proc:exit_code()) .. ":\n" .. proc:log())
    end
    return text and tonumber(text)
  end, 10, "fakebroker to listen")
  return {
    url = "amqp://guest:guest@127.0.0.1:" .. port .. "/",
    proc = proc,
    records = function() return H.records(rec) end,
  }
end

return H
