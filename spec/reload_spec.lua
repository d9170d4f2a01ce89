-- Live editing: each version of the script lives in its own Lua state, jobs
-- finish on the version they started on, a bad save never stops the worker,
-- and one editor save gives one reload. Real broker, real warren processes.
local H = require "support.helper"

-- A Lua pattern matching s literally.
local function literal(s)
  return (s:gsub("%p", "%%%0"))
end

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do n = n + 1 end
  return n
end

-- A job script labelled `code`. Each job records "start" and "end" with its
-- id, warren.version, the label and msg.redelivered. A "hold" body waits
-- until the file in RELEASE_FILE exists; any other body is a sleep.
local function job(code)
  return H.RECORD_LUA .. [[
local warren = require "warren"
local CODE = ]] .. H.lua_string(code) .. [[

local function released()
  local f = io.open(os.getenv("RELEASE_FILE") or "", "r")
  if f then f:close() end
  return f ~= nil
end
function handle(body, msg)
  record("start", msg.message_id, warren.version, CODE, tostring(msg.redelivered))
  if body == "hold" then
    while not released() do warren.sleep(0.02) end
  else
    warren.sleep(tonumber(body) or 0)
  end
  record("end", msg.message_id, warren.version, CODE, tostring(msg.redelivered))
end
]]
end

-- Editors' ways of saving a file.
local function save_in_place(path, text)
  H.write_file(path, text)
end
local function save_by_rename(path, text)
  H.write_file(path .. ".tmp", text)
  assert(os.rename(path .. ".tmp", path))
end

-- The records of a file by kind and id: t.start[id], t["end"][id] -> lists.
local function index(rec)
  local t = { start = {}, ["end"] = {} }
  for _, r in ipairs(H.records(rec)) do
    local by_id = t[r[1]]
    by_id[r[2]] = by_id[r[2]] or {}
    table.insert(by_id[r[2]], r)
  end
  return t
end

-- The "end" record of id, or nil.
local function ended(rec, id)
  local list = index(rec)["end"][id]
  return list and list[1]
end

local function ended_count(rec)
  local n = 0
  for _ in pairs(index(rec)["end"]) do n = n + 1 end
  return n
end

-- Asserts that each of ids ran exactly once from start to end on a single
-- version of the code, was never redelivered, and that no other job ran.
local function assert_once(rec, ids)
  local t = index(rec)
  local want = {}
  for _, id in ipairs(ids) do
    want[id] = true
    local s, e = t.start[id] or {}, t["end"][id] or {}
    assert.equal(1, #s, id .. " started " .. #s .. " times")
    assert.equal(1, #e, id .. " ended " .. #e .. " times")
    assert.equal(s[1][3], e[1][3], id .. " started on version " .. s[1][3] .. ", ended on "
      .. e[1][3])
    assert.equal(s[1][4], e[1][4], id .. " changed code while it ran")
    assert.equal("false", s[1][5], id .. " was redelivered")
  end
  for id in pairs(t.start) do assert.is_true(want[id], "unexpected job " .. id) end
end

describe("reload", function()
  after_each(H.stop_all)

  for _, how in ipairs({ "the file changes", "SIGHUP" }) do
    it("finishes a job started on version 1 on version 1 while new messages run on version 2 ("
      .. how .. ")", function()
      local q = H.queue("pin")
      local rec = H.record_file()
      local release = H.tmpdir() .. "/release"
      local script = H.script(job("one"))
      local args = { "--prefetch", "4", "--log-level", "debug" }
      if how == "SIGHUP" then args[#args + 1] = "--no-watch" end
      local proc = H.worker(script, q, args, { [H.RECORD_ENV] = rec, RELEASE_FILE = release })
      H.publish(q, 1, { prefix = "held", body = "hold" })
      H.wait_until(function() return index(rec).start.held1 end, 10, "held1 to start")

      local mark = proc:mark()
      save_in_place(script, job("two"))
      local why = literal(script) .. " changed"
      if how == "SIGHUP" then
        why = "SIGHUP"
        proc:signal("HUP")
      end
      -- Version 1 stays alive for held1: two versions.
      proc:wait_log("reloaded %(" .. why .. "%): version 2 serves new messages; 2 versions alive",
        10, mark)

      local ids = H.publish(q, 3, { prefix = "new", body = "0" })
      H.wait_until(function() return ended_count(rec) == 3 end, 10, "three new jobs")
      for _, id in ipairs(ids) do
        local r = ended(rec, id)
        assert.same({ "2", "two" }, { r[3], r[4] })
      end
      assert.is_nil(ended(rec, "held1"))
      assert.same({ "1", "one" }, { index(rec).start.held1[1][3], index(rec).start.held1[1][4] })
      assert.is_nil(proc:log():find("closed script version 1;", mark + 1, true))

      -- held1 ends on the code it started with; then version 1 is closed.
      H.write_file(release, "")
      H.wait_until(function() return ended(rec, "held1") end, 10, "held1 to end")
      assert.same({ "1", "one" }, { ended(rec, "held1")[3], ended(rec, "held1")[4] })
      proc:wait_log("closed script version 1; 1 version alive", 10, mark)

      H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
      assert.equal(0, H.term(proc))
      table.insert(ids, "held1")
      assert_once(rec, ids)
      assert.same({}, H.drain(q))
    end)
  end

  it("keeps the old version serving when a save does not compile, and picks up the fix as "
    .. "version 3", function()
    local q = H.queue("syntax")
    local rec = H.record_file()
    local script = H.script(job("one"))
    local proc = H.worker(script, q, { "--prefetch", "2" }, { [H.RECORD_ENV] = rec })
    local ids = H.publish(q, 5, { prefix = "a", body = "0.05" })
    H.wait_until(function() return ended_count(rec) == 5 end, 10, "five jobs on version 1")

    -- Line 1 is H.RECORD_LUA plus the require; the parser stops at line 4.
    local mark = proc:mark()
    save_in_place(script, H.RECORD_LUA .. [[local warren = require "warren"
function handle(body, msg)
  return body +
end
]])
    proc:wait_log("reload %(%S+ changed%) failed, version 1 keeps serving: "
      .. literal(script) .. ":4: unexpected symbol near 'end'", 10, mark)
    for _, id in ipairs(H.publish(q, 5, { prefix = "b", body = "0.05" })) do
      ids[#ids + 1] = id
    end
    H.wait_until(function() return ended_count(rec) == 10 end, 10, "five jobs after the bad save")

    mark = proc:mark()
    save_in_place(script, job("three"))
    proc:wait_log("reloaded %(%S+ changed%): version 3 serves new messages", 10, mark)
    for _, id in ipairs(H.publish(q, 5, { prefix = "c", body = "0.05" })) do
      ids[#ids + 1] = id
    end
    H.wait_until(function() return ended_count(rec) == 15 end, 10, "five jobs after the fix")

    for _, id in ipairs(ids) do
      local r = ended(rec, id)
      local want = id:sub(1, 1) == "c" and { "3", "three" } or { "1", "one" }
      assert.same(want, { r[3], r[4] }, id)
    end
    assert.is_nil(proc:log():find("version 2 serves", 1, true))
    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
    assert_once(rec, ids)
    assert.same({}, H.drain(q))
  end)

  it("logs an error while loading, a missing handle and an endless top level with file:line, "
    .. "and serves on", function()
    local q = H.queue("badload")
    local rec = H.record_file()
    local script = H.script(job("one"))
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    local ids = {}
    for i, case in ipairs({
      { "local x = 1\nerror('not today')\n", literal(script) .. ":2: not today" },
      { "local x = 1\n", literal(script) .. ": no handle%(body, msg%) function" },
      { "local n = 0\nwhile true do\n  n = n + 1\nend\n",
        literal(script) .. ":%d: still loading after 5 s" },
    }) do
      local mark = proc:mark()
      save_by_rename(script, case[1])
      proc:wait_log("reload %(%S+ changed%) failed, version 1 keeps serving: " .. case[2], 15,
        mark)
      local id = H.publish(q, 1, { prefix = "bad" .. i .. "-" })[1]
      H.wait_until(function() return ended(rec, id) end, 10, id .. " handled")
      assert.same({ "1", "one" }, { ended(rec, id)[3], ended(rec, id)[4] })
      ids[#ids + 1] = id
    end
    assert.equal(0, H.term(proc))
    assert_once(rec, ids)
    assert.same({}, H.drain(q))
  end)

  it("survives 50 rapid saves during a stream of messages: each message once, on one version, "
    .. "and old versions closed", function()
    local q = H.queue("rapid")
    local rec = H.record_file()
    local script = H.script(job("save0"))
    local prefetch = 8
    local proc = H.worker(script, q, { "--prefetch", prefetch, "--log-level", "debug" },
      { [H.RECORD_ENV] = rec })
    local ids = {}
    local function publish(prefix, n, body)
      for _, id in ipairs(H.publish(q, n, { prefix = prefix, body = body })) do
        ids[#ids + 1] = id
      end
    end
    -- Gaps shorter than the reload settle time, with a pause now and then so
    -- that the watcher reloads mid-stream too; every third save also sends
    -- SIGHUP, which reloads at once while jobs of older versions run.
    local gaps = { 0.02, 0.05, 0.1, 0.03, 0.2, 0.01, 0.08, 0.3, 0.04, 1.2 }
    for i = 1, 50 do
      local save = i % 2 == 0 and save_in_place or save_by_rename
      save(script, job("save" .. i))
      if i % 3 == 0 then proc:signal("HUP") end
      if i % 2 == 0 then publish("s" .. i .. "-", 4, "0.6") end
      H.sleep(gaps[(i - 1) % #gaps + 1])
    end
    H.wait_until(function() return ended_count(rec) == #ids end, 30, "the stream handled")

    -- The last save is picked up by the watcher: probe until a job runs it.
    local probes = 0
    H.wait_until(function()
      probes = probes + 1
      publish("probe" .. probes .. "-", 1, "0")
      local id = ids[#ids]
      H.wait_until(function() return ended(rec, id) end, 10, id .. " handled")
      return ended(rec, id)[4] == "save50"
    end, 10, "a job on the last save")
    assert.is_true(proc:running(), proc:log())

    -- Every old version is closed once its last job has ended.
    local function alive_counts()
      local list = {}
      for n in proc:log():gmatch("(%d+) versions? alive") do list[#list + 1] = tonumber(n) end
      return list
    end
    H.wait_until(function()
      local list = alive_counts()
      return list[#list] == 1
    end, 10, "one version alive")
    local most = math.max(table.unpack(alive_counts()))
    assert.is_true(most <= prefetch + 1, "up to " .. most .. " versions alive")
    assert.is_true(most >= 2, "no reload ever overlapped a job")

    local log = proc:log()
    local reloads = count(log, "reloaded %(")
    local versions = {}
    for _, r in ipairs(H.records(rec)) do versions[r[3]] = true end
    local distinct = 0
    for _ in pairs(versions) do distinct = distinct + 1 end
    -- At most one per SIGHUP and one per save; most SIGHUPs find a whole file.
    assert.is_true(reloads >= 10 and reloads <= 50 + 16, reloads .. " reloads")
    assert.is_true(distinct >= 5, "jobs ran on only " .. distinct .. " versions")
    assert.equal(reloads, count(log, "closed script version"))

    H.wait_until(function() return H.depth(q) == 0 end, 10, "queue empty")
    assert.equal(0, H.term(proc))
    assert_once(rec, ids)
    assert.same({}, H.drain(q))
  end)

  it("reloads once per editor save: in place in two writes, renamed over, or vim's backup dance",
    function()
    local q = H.queue("saves")
    local rec = H.record_file()
    local script = H.script(job("v1"))
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    local styles = {
      function(path, text) -- a slow writer: two writes, 50 ms apart
        local f = assert(io.open(path, "wb"))
        f:write(text:sub(1, #text // 2))
        f:flush()
        H.sleep(0.05)
        f:write(text:sub(#text // 2 + 1))
        f:close()
      end,
      save_by_rename,
      function(path, text) -- vim: probe file, backup by rename, new file, backup removed
        local dir = path:match("^(.*)/")
        H.write_file(dir .. "/4913", "")
        os.remove(dir .. "/4913")
        assert(os.rename(path, path .. "~"))
        H.write_file(path, text)
        os.remove(path .. "~")
      end,
    }
    local ids = {}
    for i, save in ipairs(styles) do
      local mark = proc:mark()
      save(script, job("save" .. i))
      -- Version i + 1 exactly: an extra reload would have taken a number.
      proc:wait_log("reloaded %(%S+ changed%): version " .. (i + 1) .. " serves", 10, mark)
      local id = H.publish(q, 1, { prefix = "after" .. i .. "-" })[1]
      H.wait_until(function() return ended(rec, id) end, 10, id .. " handled")
      assert.same({ tostring(i + 1), "save" .. i }, { ended(rec, id)[3], ended(rec, id)[4] })
      ids[#ids + 1] = id
    end
    -- Proving that no second reload follows needs a quiet period longer than
    -- the settle time (at most a little over a second).
    H.sleep(1.5)
    assert.equal(3, count(proc:log(), "reloaded %("))
    assert.equal(0, count(proc:log(), "failed"))
    assert.equal(0, H.term(proc))
    assert_once(rec, ids)
  end)

  it("puts the script's directory on package.path and reloads when a module it required "
    .. "changes", function()
    local q = H.queue("modules")
    local rec = H.record_file()
    local dir = H.tmpdir()
    assert.equal(0, select(3, os.execute("mkdir " .. H.quote(dir .. "/lib"))))
    local helper, util = dir .. "/helper.lua", dir .. "/lib/util.lua"
    H.write_file(helper, 'return { code = "h1" }\n')
    H.write_file(util, 'return { code = "u1" }\n')
    local script = dir .. "/job.lua"
    H.write_file(script, H.RECORD_LUA .. [[local warren = require "warren"
local helper, util = require "helper", require "lib.util"
function handle(body, msg)
  local code = helper.code .. "+" .. util.code
  record("start", msg.message_id, warren.version, code, tostring(msg.redelivered))
  record("end", msg.message_id, warren.version, code, tostring(msg.redelivered))
end
]])
    -- warren runs in another directory: only package.path can find the modules.
    local proc = H.worker(script, q, {}, { [H.RECORD_ENV] = rec })
    local ids = {}
    local function probe(version, code)
      local id = H.publish(q, 1, { prefix = "p" .. #ids + 1 .. "-" })[1]
      H.wait_until(function() return ended(rec, id) end, 10, id .. " handled")
      assert.same({ tostring(version), code }, { ended(rec, id)[3], ended(rec, id)[4] })
      ids[#ids + 1] = id
    end
    probe(1, "h1+u1")

    local mark = proc:mark()
    save_in_place(helper, 'return { code = "h2" }\n')
    proc:wait_log("reloaded %(" .. literal(helper) .. " changed%): version 2 serves", 10, mark)
    probe(2, "h2+u1")

    mark = proc:mark()
    save_by_rename(util, 'return { code = "u2" }\n')
    proc:wait_log("reloaded %(" .. literal(util) .. " changed%): version 3 serves", 10, mark)
    probe(3, "h2+u2")

    mark = proc:mark()
    save_in_place(helper, 'local M = {}\nM.code = = "h3"\nreturn M\n')
    proc:wait_log("reload %(" .. literal(helper) .. " changed%) failed, version 3 keeps serving: .*"
      .. literal(helper) .. ":2: unexpected symbol near '='", 10, mark)
    probe(3, "h2+u2")

    mark = proc:mark()
    save_by_rename(helper, 'return { code = "h5" }\n')
    proc:wait_log("reloaded %(" .. literal(helper) .. " changed%): version 5 serves", 10, mark)
    probe(5, "h5+u2")

    assert.equal(0, H.term(proc))
    assert_once(rec, ids)
  end)
end)
