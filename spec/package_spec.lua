-- The Debian package that scripts/package builds, unpacked with dpkg -x: what it holds, and
-- that it works where it lands. The stripped binary runs and loads the examples, the manual
-- pages render and agree with --help and the contract, the unit passes systemd-analyze verify
-- and fits the drain, the docs' links resolve, and the service's user can be created.
local H = require "support.helper"

local q = H.quote

-- Runs a shell command line; returns its exit code and its output (stdout and stderr).
local function run(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  local _, _, code = p:close()
  return code, out
end

-- Runs a shell command line that must succeed; returns its output.
local function sh(cmd)
  local code, out = run(cmd)
  assert(code == 0, cmd .. " failed (" .. tostring(code) .. "):\n" .. out)
  return out
end

local function have(program)
  return run("command -v " .. q(program)) == 0
end

-- A Lua pattern matching s literally.
local function literal(s)
  return (s:gsub("%p", "%%%0"))
end

-- A manual page as a user reads it: plain text, lines as wide as they go.
local function render(page)
  return sh("LC_ALL=C MANWIDTH=200 man -l " .. q(page))
end

-- The exit codes of the contract's table, in order.
local function contract_exit_codes()
  local contract = assert(H.read_file(H.source_dir .. "/docs/contract.md"))
  local codes = {}
  for code in assert(contract:match("\n## Exit codes\n(.-)\n\n")):gmatch("\n| (%d+) |") do
    codes[#codes + 1] = code
  end
  assert(#codes > 0, "no exit codes in docs/contract.md")
  return codes
end

-- The markdown links of text: each target, without its #anchor, and the anchor.
local function links(text)
  local list = {}
  for target in text:gmatch("%]%(([^)%s]+)%)") do
    if not target:match("^%a[%w+.-]*:") then -- not a URL
      local file, anchor = target:match("^([^#]*)#?(.*)$")
      list[#list + 1] = { target = target, file = file, anchor = anchor }
    end
  end
  return list
end

-- The anchors of a markdown file's headings, as GitHub makes them.
local function anchors(text)
  local set = {}
  for heading in ("\n" .. text):gmatch("\n#+ ([^\n]+)") do
    set[(heading:lower():gsub("[^%w%s_-]", ""):gsub("%s", "-"))] = true
  end
  return set
end

-- The Debian architecture the package is for: a cross build's (WARREN_TEST_ARCH, the name of
-- its toolchain file), else this machine's.
local function package_arch()
  return os.getenv("WARREN_TEST_ARCH") or sh("dpkg --print-architecture"):match("%S+")
end

-- What file(1) says of an executable for each Debian architecture warren is packaged for,
-- after "ELF 64-bit LSB pie executable, " (or 32-bit).
local elf_machines = {
  amd64 = "x86-64,", i386 = "Intel 80386,", arm64 = "ARM aarch64,", armhf = "ARM, EABI5 ",
}

describe("the Debian package", function()
  local deb, root, doc

  lazy_setup(function()
    local out = H.tmpdir()
    local report = sh(q(H.source_dir .. "/scripts/package") .. " -B " .. q(H.build_dir)
      .. " -o " .. q(out))
    deb = report:match("([^\n]+)\n$")
    assert(deb and H.read_file(deb), "scripts/package printed no package:\n" .. report)
    root = H.tmpdir()
    sh("dpkg -x " .. q(deb) .. " " .. q(root))
    doc = root .. "/usr/share/doc/warren"
  end)

  it("is warren at the project's version, with what it needs to run", function()
    local cmake = assert(H.read_file(H.source_dir .. "/CMakeLists.txt"))
    local version = assert(cmake:match("project%(warren VERSION ([%d%.]+)"))
    local arch = package_arch()
    assert.equal(("warren_%s-1_%s.deb"):format(version, arch), deb:match("[^/]+$"))
    local function field(name)
      return sh("dpkg-deb -f " .. q(deb) .. " " .. name):match("^(.-)%s*$")
    end
    assert.equal("warren", field("Package"))
    assert.equal(version .. "-1", field("Version"))
    assert.equal("net", field("Section"))
    assert.matches("^.+ <.+@.+>$", field("Maintainer"))
    assert.matches("^worker host for RabbitMQ work queues", field("Description"))
    -- dpkg-shlibdeps names the packages of the libraries the binary links; CMakeLists.txt
    -- names them itself where dpkg-shlibdeps is missing, and must name the same.
    -- A sanitizer build also links the sanitizers' runtimes: not a dependency of warren.
    local function names(list)
      local set = {}
      for name in (list .. ","):gmatch("%s*([^%s,(]+)[^,]*,") do
        if not name:match("^lib%a?san%d*$") and not name:match("^libubsan%d*$") then
          set[#set + 1] = name
        end
      end
      table.sort(set)
      return set
    end
    local fallback = assert(cmake:match('CPACK_DEBIAN_PACKAGE_DEPENDS%s+"([^"]+)"'))
    assert.same(names(fallback), names(field("Depends")))
  end)

  it("holds only root's files, executables 0755 and the rest 0644", function()
    for line in sh("dpkg-deb -c " .. q(deb)):gmatch("[^\n]+") do
      local mode, owner, path = line:match("^(%S+) (%S+) +%d+ %S+ %S+ %.(/.*)$")
      assert(mode, "unexpected line: " .. line)
      assert.equal("root/root", owner, line)
      if mode:sub(1, 1) == "d" or path == "/usr/bin/warren" then
        assert.equal("rwxr-xr-x", mode:sub(2), line)
      else
        assert.equal("-rw-r--r--", mode, line)
      end
    end
  end)

  it("holds a stripped binary for its architecture that runs", function()
    local bin = root .. "/usr/bin/warren"
    local kind = sh("file -b " .. q(bin))
    local machine = elf_machines[package_arch()]
    assert(machine, "no machine known for the architecture " .. package_arch())
    assert.matches(" executable, " .. machine, kind, 1, true)
    assert.matches(", stripped", kind, 1, true)
    local _, version = H.run({ "--version" })
    assert.equal(version, sh(H.emulated(bin) .. " --version"))
  end)

  it("holds every example, and each job script loads with warren check", function()
    local want = sh("cd " .. q(H.source_dir .. "/examples") .. " && ls")
    assert.equal(want, sh("cd " .. q(doc .. "/examples") .. " && ls"))
    local n = 0
    for name in want:gmatch("[^\n]+%.lua") do
      if name:match("_spec%.lua$") then goto next end -- a busted spec of a job script
      local path = doc .. "/examples/" .. name
      assert.equal(path .. ": ok\n", sh(H.emulated(root .. "/usr/bin/warren") .. " check " .. q(path)))
      n = n + 1
      ::next::
    end
    assert.is_true(n >= 2, "examples found: " .. n)
  end)

  it("installs the README and docs/ so that their links resolve", function()
    local files = { "README.md" }
    for name in sh("cd " .. q(H.source_dir .. "/docs") .. " && ls *.md"):gmatch("[^\n]+") do
      files[#files + 1] = "docs/" .. name
    end
    local checked = {}
    for _, file in ipairs(files) do
      local path = doc .. "/" .. file
      local text = assert(H.read_file(path), "not installed: " .. file)
      assert.equal(assert(H.read_file(H.source_dir .. "/" .. file)), text)
      local dir = path:match("^(.*)/")
      for _, link in ipairs(links(text)) do
        local target = link.file == "" and path or dir .. "/" .. link.file
        local linked = H.read_file(target)
        assert(linked, file .. ": the link " .. link.target .. " leads nowhere")
        if link.anchor ~= "" and target:match("%.md$") then
          assert(anchors(linked)[link.anchor], file .. ": no heading for " .. link.target)
        end
        checked[file .. " " .. link.target] = true
      end
    end
    assert.is_true(checked["README.md docs/contract.md#running-programs"])
    assert.is_true(checked["README.md examples/thumbnail.lua"])
  end)

  describe("manual pages", function()
    local function page(name)
      return root .. "/usr/share/man/" .. name
    end

    it("warren(1) renders, with every option, its variable and every exit code", function()
      local text = render(page("man1/warren.1.gz"))
      assert.matches("^warren%(1%)", text)
      local options = assert(text:match("\nOPTIONS\n(.-)\nENVIRONMENT\n"), text)
      local _, help = H.run({ "--help" })
      local n = 0
      for option in help:gmatch("%-%-([%a-]+)") do
        -- Each one heads a paragraph of its own: "-u, --url URL", "--declare".
        local term = "\n       [-%a, ]*%-%-" .. literal(option) .. "%f[^%w-]"
        local where = (option == "help" or option == "version") and text or options
        assert(where:find(term), "warren(1) has no paragraph for --" .. option)
        if where == options then
          local var = "WARREN_" .. option:upper():gsub("%-", "_")
          assert(text:find(var, 1, true), "warren(1) does not name " .. var)
        end
        n = n + 1
      end
      assert.is_true(n > 10, help)
      for _, code in ipairs(contract_exit_codes()) do
        assert.matches("\n +" .. code .. "\n", text)
      end
      for _, signal in ipairs({ "SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2" }) do
        assert.matches(signal, text, 1, true)
      end
    end)

    it("warren-lua(7) renders, with every function of the contract's warren module", function()
      local text = render(page("man7/warren-lua.7.gz"))
      assert.matches("^warren%-lua%(7%)", text)
      local contract = assert(H.read_file(H.source_dir .. "/docs/contract.md"))
      local n = 0
      for cell in contract:gmatch("\n| (`warren[^|]+)|") do
        for name in cell:gmatch("`(warren%.[%w_.]+)") do
          assert.matches(literal(name), text)
          n = n + 1
        end
        for level in cell:gmatch("/(%a+)") do
          assert.matches("warren.log." .. level, text, 1, true)
        end
      end
      assert.is_true(n >= 10, "functions found in the contract: " .. n)
    end)
  end)

  describe("systemd unit warren@.service", function()
    local function unit_text()
      return assert(H.read_file(root .. "/usr/lib/systemd/system/warren@.service"))
    end

    local function setting(text, key)
      return text:match("\n" .. key .. "=([^\n]*)")
    end

    local verify_it = have("systemd-analyze") and it or pending
    verify_it("passes systemd-analyze verify with the unpacked binary and man pages", function()
      local dir = H.tmpdir()
      local unit = unit_text():gsub("\nExecStart=/usr/bin/warren ",
        "\nExecStart=" .. root:gsub("%%", "%%%%") .. "/usr/bin/warren ")
      H.write_file(dir .. "/warren@.service", unit)
      local code, out = run("cd " .. q(dir) .. " && MANPATH=" .. q(root .. "/usr/share/man")
        .. " systemd-analyze verify ./warren@.service")
      assert.equal(0, code, out)
      assert.equal("", out)
    end)

    it("runs the packaged binary on the script and options of the instance's file", function()
      local text = unit_text()
      assert.equal("/usr/bin/warren ${WARREN_SCRIPT}", setting(text, "ExecStart"))
      assert.equal("/etc/warren/%i.env", setting(text, "EnvironmentFile"))
      assert.equal("notify", setting(text, "Type"))
      assert.equal("warren", setting(text, "User"))
    end)

    it("stops warren alone, after its drain and forced stage, and restarts only what can mend",
      function()
      local text = unit_text()
      assert.equal("mixed", setting(text, "KillMode"))
      local _, help = H.run({ "--help" })
      local drain = tonumber(help:match("%-%-drain%-timeout SECS[^\n]*%(default ([%d.]+)%)"))
      local stop = tonumber(setting(text, "TimeoutStopSec"):match("^(%d+)s$"))
      assert.is_true(stop > drain + 1 + 2, "TimeoutStopSec " .. stop .. " s, drain " .. drain)
      assert.equal("on-failure", setting(text, "Restart"))
      local codes = {}
      for _, code in ipairs(contract_exit_codes()) do codes[code] = true end
      local prevent = setting(text, "RestartPreventExitStatus")
      assert.equal("64 76 77 78", prevent)
      for code in prevent:gmatch("%d+") do assert.is_true(codes[code], code) end
    end)

    local sysusers_it = have("systemd-sysusers") and it or pending
    sysusers_it("has its user created by the package's sysusers.d file", function()
      local alt = H.tmpdir()
      sh("mkdir " .. q(alt .. "/etc") .. " && systemd-sysusers --root=" .. q(alt) .. " "
        .. q(root .. "/usr/lib/sysusers.d/warren.conf"))
      assert.matches("\nwarren:x:%d+:%d+:[^:]*:/var/lib/warren:[^\n]*nologin\n",
        "\n" .. assert(H.read_file(alt .. "/etc/passwd")))
      local control = H.tmpdir() .. "/control"
      sh("dpkg-deb -e " .. q(deb) .. " " .. q(control) .. " && sh -n " .. q(control .. "/postinst"))
      assert.matches("systemd-sysusers warren.conf", H.read_file(control .. "/postinst"), 1, true)
    end)
  end)
end)
