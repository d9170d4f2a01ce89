-- Proves the TLS test tools: the certificates of spec/support/tls.lua and a node started by
-- scripts/broker with WARREN_BROKER_TLS. Needs no test broker: it starts a node of its own.
local H = require "support.helper"
local tls = require "support.tls"

-- `openssl ARGS...` -> exit code, output (stdout and stderr); stdin is /dev/null.
local function openssl(...)
  local words = { "timeout", "20", "openssl" }
  for _, a in ipairs({ ... }) do
    words[#words + 1] = H.quote(a)
  end
  local p = io.popen(table.concat(words, " ") .. " </dev/null 2>&1")
  local out = p:read("a")
  local _, _, code = p:close()
  return code, out
end

describe("support.tls certificates", function()
  local certs

  setup(function()
    local started = H.now()
    certs = tls.certs({ user = "alice" })
    assert.is_true(H.now() - started < 2, "tls.certs took more than 2 s")
  end)

  it("signs the server, client, expired and wrong-host certificates with the CA", function()
    local code, out = openssl("verify", "-CAfile", certs.ca, certs.server, certs.client,
      certs.wronghost)
    assert.equal(0, code, out)
    code, out = openssl("verify", "-CAfile", certs.ca, "-verify_hostname", "localhost",
      "-verify_ip", "127.0.0.1", certs.server)
    assert.equal(0, code, out)
  end)

  it("names the client by its CN and the wrong host by another name", function()
    local _, out = openssl("x509", "-in", certs.client, "-noout", "-subject")
    assert.matches("CN = alice", out)
    local code
    code, out = openssl("verify", "-CAfile", certs.ca, "-verify_hostname", "localhost",
      certs.wronghost)
    assert.are_not.equal(0, code)
    assert.matches("hostname mismatch", out)
  end)

  it("makes an expired certificate that is otherwise valid for localhost", function()
    local code, out = openssl("verify", "-CAfile", certs.ca, "-verify_hostname", "localhost",
      certs.expired)
    assert.are_not.equal(0, code)
    assert.matches("certificate has expired", out)
    _, out = openssl("x509", "-in", certs.expired, "-noout", "-dates")
    assert.matches("notBefore=Jan  1 00:00:00 2020 GMT", out)
    assert.matches("notAfter=Jan  2 00:00:00 2020 GMT", out)
  end)

  it("makes an unrelated CA that does not verify the server", function()
    local code, out = openssl("verify", "-CAfile", certs.other_ca, certs.server)
    assert.are_not.equal(0, code)
    assert.matches("unable to get local issuer certificate", out)
  end)
end)

describe("support.tls broker", function()
  local certs, node

  setup(function()
    certs = tls.certs()
    node = tls.broker(certs)
  end)

  teardown(function()
    if node then node:stop() end
  end)

  -- wtool against the TLS listener, verifying the server against ca (peer and host name).
  local function wtool_tls(ca, ...)
    return H.wtool({ "--url", node.tls_url, "--timeout", 20, ... }, { WARREN_TEST_CACERT = ca })
  end

  -- A TLS handshake with openssl s_client as client; -> exit code, output.
  local function handshake(...)
    return openssl("s_client", "-connect", "localhost:" .. node.tls_port, "-CAfile", certs.ca,
      "-verify_return_error", "-verify_hostname", "localhost", ...)
  end

  it("listens for AMQPS with a server certificate verified against ca.pem", function()
    assert.matches("^amqps://guest:guest@localhost:%d+$", node.tls_url)
    assert.matches("^amqp://guest:guest@127%.0%.0%.1:%d+$", node.url)
    local code, out = handshake()
    assert.equal(0, code, out)
    assert.matches("Verification: OK", out)
    assert.matches("Verified peername: localhost", out)

    local q = H.unique_name("support-tls")
    local err
    code, out, err = wtool_tls(certs.ca, "declare", q)
    assert.equal(0, code, err)
    code, out, err = wtool_tls(certs.ca, "depth", q)
    assert.equal(0, code, err)
    assert.equal("0 0\n", out)
    -- The plain listener is there as before, on the same node.
    code, out, err = H.wtool({ "--url", node.url, "depth", q })
    assert.equal(0, code, err)
  end)

  it("asks for a client certificate, accepts one from the CA, and offers EXTERNAL", function()
    local code, out = handshake("-cert", certs.client, "-key", certs.client_key)
    assert.equal(0, code, out)
    assert.matches("Acceptable client certificate CA names\nCN = warren%-test%-ca", out)

    -- connection.start lists the mechanisms; s_client -quiet keeps reading after stdin ends.
    local header = H.tmpdir() .. "/header"
    H.write_file(header, "AMQP\0\0\9\1")
    local proc = H.spawn({ "sh", "-c", "exec openssl s_client -quiet -connect localhost:"
      .. node.tls_port .. " -CAfile " .. H.quote(certs.ca) .. " -cert " .. H.quote(certs.client)
      .. " -key " .. H.quote(certs.client_key) .. " -verify_return_error <" .. H.quote(header) })
    local ok, err = pcall(proc.wait_log, proc, "PLAIN AMQPLAIN EXTERNAL", 20)
    proc:stop()
    assert(ok, err)
  end)

  it("fails verification against an unknown CA", function()
    local code, out = openssl("s_client", "-connect", "localhost:" .. node.tls_port, "-CAfile",
      certs.other_ca, "-verify_return_error")
    assert.are_not.equal(0, code)
    -- The node sends the CA certificate along with its own: it is the chain's root that is unknown.
    assert.matches("self%-signed certificate in certificate chain", out)
    local err
    code, _, err = wtool_tls(certs.other_ca, "depth", "none")
    assert.equal(1, code)
    assert.matches("cannot connect", err)
  end)

  -- Both openssl and wtool refuse the server's certificate, openssl saying why.
  local function refused(why)
    local code, out = handshake()
    assert.are_not.equal(0, code)
    assert.matches(why, out)
    local err
    code, _, err = wtool_tls(certs.ca, "depth", "none")
    assert.equal(1, code)
    assert.matches("cannot connect", err)
  end

  it("swaps in the expired and the wrong-host certificate, and back", function()
    node:use_cert("expired")
    refused("certificate has expired")
    node:use_cert("wronghost")
    refused("hostname mismatch")
    -- The certificate itself is good: only the name is wrong.
    local code, out = openssl("s_client", "-connect", "localhost:" .. node.tls_port, "-CAfile", certs.ca,
      "-verify_return_error", "-verify_hostname", "not-this-host.example")
    assert.equal(0, code, out)

    node:use_cert("server")
    code, out = handshake()
    assert.equal(0, code, out)
  end)

  it("stops, leaving no process behind", function()
    local dir = node.dir
    assert.are_not.same({}, H.pids_in(dir))
    node:stop()
    assert.same({}, H.pids_in(dir))
    local code, out = H.broker_script(dir, { "status" })
    assert.equal(1, code)
    assert.matches("^stopped", out)
    code = H.broker_script(dir, { "tls-url" })
    assert.equal(1, code)
    node:stop() -- again: nothing to do
  end)
end)
