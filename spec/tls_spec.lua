-- TLS against a real broker with certificates made for the run: the broker is verified against
-- --tls-ca and the URL's host name, a client certificate is the login when the URL has no
-- password, and each failure gives one line and its exit code at once.
local H = require "support.helper"
local tls = require "support.tls"

local recorder = H.RECORD_LUA .. [[
  function handle(body, msg) record("done", msg.message_id) end]]

describe("TLS", function()
  local certs, node

  setup(function()
    certs = tls.certs({ user = H.unique_name("cert-user") })
    node = tls.broker(certs)
  end)
  teardown(function()
    if node then node:stop() end
  end)
  after_each(H.stop_all)

  -- Publishes n messages to queue q of the TLS node (over its plain port).
  local function publish(q, n, prefix)
    H.wtool({ "--url", node.url, "publish", q, "--count", n, "--prefix", prefix })
    local ids = {}
    for i = 1, n do ids[i] = prefix .. i end
    return ids
  end

  -- Runs warren over TLS with args until it consumes, hands it n messages, stops it.
  local function consume(url, args, prefix)
    local q = H.unique_name("tls")
    local rec = H.record_file()
    local argv = { "--url", url, "-q", q, "--declare", "--tls-ca", certs.ca }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local proc = H.start(H.script(recorder), argv, { env = { [H.RECORD_ENV] = rec } })
    proc:wait_log("consuming '", 15)
    local ids = publish(q, 3, prefix)
    H.wait_until(function() return #H.records(rec) == 3 end, 10, "three over TLS")
    assert.same(ids, H.ids(H.records(rec)))
    proc:signal("TERM")
    assert.equal(0, proc:wait(10), proc:log())
    return proc:log()
  end

  it("consumes with the broker verified against --tls-ca and the host name", function()
    local log = consume(node.tls_url, {}, "verified")
    assert.matches("consuming '[^']+' from amqps://guest@localhost:" .. node.tls_port .. "/", log)
  end)

  it("logs in with the client certificate when the URL holds no password", function()
    local url = "amqps://localhost:" .. node.tls_port .. "/"
    local args = { "--tls-cert", certs.client, "--tls-key", certs.client_key }
    -- Not a user of the broker yet: the certificate is accepted, the login refused.
    local code, out = H.run({ "--url", url, "-q", "x", "--connect-timeout", 5, "--tls-ca", certs.ca,
      args[1], args[2], args[3], args[4], H.script(recorder) }, { timeout = 20 })
    assert.equal(77, code, out)
    assert.matches("login refused", out, 1, true)
    assert(node:ctl("add_user", certs.user, H.unique_name("unused")))
    assert(node:ctl("set_permissions", "-p", "/", certs.user, ".*", ".*", ".*"))
    local log = consume(url, args, "external")
    -- Named without a user: the certificate is the login.
    assert.matches("from amqps://localhost:" .. node.tls_port .. "/", log, 1, true)
    -- With a password in the URL the login stays PLAIN, as guest.
    consume(node.tls_url, args, "plain")
  end)

  it("says why and exits 76 at once when the broker cannot be trusted", function()
    local function refused(url, args, expect, why)
      local argv = { "--url", url, "-q", "x", "--connect-timeout", 30 }
      for _, a in ipairs(args) do argv[#argv + 1] = a end
      argv[#argv + 1] = H.script(recorder)
      local t0 = H.now()
      local code, out = H.run(argv, { timeout = 20 })
      assert.equal(expect, code, why .. ": " .. out)
      assert.matches(why, out, 1, true)
      assert.is_true(H.now() - t0 < 5, why .. " took " .. (H.now() - t0) .. " s")
      local lines = 0
      for _ in out:gmatch("[^\n]+") do lines = lines + 1 end
      assert.equal(1, lines, out)
    end
    local ca = { "--tls-ca", certs.ca }
    refused(node.tls_url, { "--tls-ca", certs.other_ca }, 76,
      "the broker's certificate is not trusted: self-signed certificate in certificate chain")
    refused(node.tls_url, {}, 76, "the broker's certificate is not trusted")
    refused(node.url:gsub("^amqp:", "amqps:"), ca, 76, "the port does not speak TLS")
    node:use_cert("wronghost")
    refused(node.tls_url, ca, 76, "the broker's certificate is not trusted: hostname mismatch")
    node:use_cert("expired")
    refused(node.tls_url, ca, 76, "the broker's certificate is not trusted: certificate has expired")
    node:use_cert("server")
    -- A client certificate from a CA the broker does not know: refused, as a login is.
    local stranger = H.tmpdir()
    assert(os.execute("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
      .. "-subj /CN=stranger -days 1 -keyout " .. H.quote(stranger .. "/key.pem") .. " -out "
      .. H.quote(stranger .. "/cert.pem") .. " >/dev/null 2>&1"))
    refused(node.tls_url, { "--tls-ca", certs.ca, "--tls-cert", stranger .. "/cert.pem",
      "--tls-key", stranger .. "/key.pem" }, 77, "the broker refused the client certificate")
  end)

  it("refuses TLS files it cannot use before connecting, with exit 64", function()
    for _, case in ipairs({
      { { "--tls-ca", "/nonexistent/ca.pem" }, "--tls-ca: cannot read /nonexistent/ca.pem" },
      { { "--tls-cert", certs.client, "--tls-key", certs.server_key }, "--tls-key: cannot use" },
      { { "--tls-cert", certs.client }, "needs both --tls-cert and --tls-key" },
    }) do
      local argv = { "--url", node.tls_url, "-q", "x" }
      for _, a in ipairs(case[1]) do argv[#argv + 1] = a end
      argv[#argv + 1] = H.script(recorder)
      local code, out = H.run(argv)
      assert.equal(64, code, out)
      assert.matches(case[2], out, 1, true)
    end
  end)
end)
