-- spec/support/tls.lua: test certificates and a TLS broker node for the specs of warren.
--
--   local tls = require "support.tls"
--   local certs = tls.certs()                 -- a CA and certificates signed by it, in a temp dir
--   local node = tls.broker(certs)            -- a private node with an AMQPS listener
--   ... node.tls_url, certs.ca ...
--   node:use_cert("expired")                  -- the same listener now shows the expired cert
--   node:stop()
--
-- Design: one node serves every server certificate case. Its listener reads server.pem and
-- server.key from a directory of its own (node.tls_dir); use_cert replaces both files and
-- clears the node's PEM cache (ssl:clear_pem_cache(), the way RabbitMQ documents certificate
-- rotation), so the next handshake shows the new certificate. That takes about 1 s (one
-- rabbitmqctl call) where a node per case would take 5 s or more each, and it keeps the
-- node's ports and URLs. RabbitMQ 3.10 has one ssl_options set per node, so several listeners
-- on one node could not show different certificates anyway. Handshakes already done are not
-- affected: a client must connect again to see the new certificate.
local H = require "support.helper"

local tls = {}

-- Creates everything in one shell run. Keys are EC P-256 (fast to make); each certificate has
-- its own key. The expired certificate comes from `openssl ca`, the only way in OpenSSL 3.0 to
-- give a certificate a validity period in the past that is still well formed (x509 -days -1
-- gives a notAfter before the notBefore).
local SCRIPT = [=[
set -eu
cd "$1"
user=$2
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # NAME CN
  key "$1.key"
  openssl req -x509 -new -key "$1.key" -out "$1.pem" -days 3650 -subj "/CN=$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
csr() { # NAME CN
  key "$1.key"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$2"
}
ext() { # NAME CN [IP]: the extensions of a leaf certificate
  {
    printf 'basicConstraints = CA:FALSE\n'
    printf 'keyUsage = critical, digitalSignature, keyEncipherment\n'
    if [ "$2" = client ]; then
      printf 'extendedKeyUsage = clientAuth\n'
    else
      printf 'extendedKeyUsage = serverAuth\nsubjectAltName = DNS:%s%s\n' "$2" "${3:+, IP:$3}"
    fi
  } >"$1.ext"
}
sign() { # NAME SERIAL
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "$2" -days 3650 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
}

ca ca warren-test-ca
ca other-ca warren-other-ca
csr server localhost && ext server localhost 127.0.0.1 && sign server 2
csr client "$user" && ext client client && sign client 3
csr wronghost not-this-host.example && ext wronghost not-this-host.example && sign wronghost 4

# Valid for one day in 2020: openssl ca, with the little state it wants.
csr expired localhost && ext expired localhost 127.0.0.1
mkdir ca.db && : >ca.db/index.txt && echo 05 >ca.db/serial
cat >ca.cnf <<'EOF'
[ca]
default_ca = test
[test]
database = ca.db/index.txt
new_certs_dir = ca.db
serial = ca.db/serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
EOF
openssl ca -batch -notext -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr \
  -extfile expired.ext -startdate 20200101000000Z -enddate 20200102000000Z -out expired.pem \
  2>/dev/null
rm -rf ca.db ca.cnf ./*.csr ./*.ext other-ca.key
chmod 600 ./*.key
]=]

-- tls.certs(opts) -> certs: paths of new PEM files in a fresh directory (certs.dir):
--   ca, ca_key           the test CA (CN warren-test-ca)
--   server, server_key   for localhost: CN and SAN DNS localhost, SAN IP 127.0.0.1
--   client, client_key   a client certificate with CN = opts.user (default "warren-client"),
--                        for EXTERNAL logins (certs.user holds the name)
--   other_ca             an unrelated CA, for "unknown CA" cases
--   expired, expired_key for localhost as server, but valid only on 1 January 2020
--   wronghost, wronghost_key   CN and SAN DNS not-this-host.example (no IP)
-- All but other_ca are signed by ca. Takes well under a second.
function tls.certs(opts)
  opts = opts or {}
  local user = opts.user or "warren-client"
  assert(user:match("^[%w._@-]+$"), "tls.certs: user names are letters, digits and ._@- only")
  local dir = H.tmpdir()
  local script = H.tmpdir() .. "/certs.sh"
  H.write_file(script, SCRIPT)
  local p = io.popen(string.format("sh %s %s %s 2>&1", H.quote(script), H.quote(dir),
    H.quote(user)))
  local out = p:read("a")
  local ok = p:close()
  assert(ok, "tls.certs: making the certificates failed:\n" .. out)
  local certs = { dir = dir, user = user }
  for name, file in pairs({
    ca = "ca.pem", ca_key = "ca.key", server = "server.pem", server_key = "server.key",
    client = "client.pem", client_key = "client.key", other_ca = "other-ca.pem",
    expired = "expired.pem", expired_key = "expired.key", wronghost = "wronghost.pem",
    wronghost_key = "wronghost.key",
  }) do
    certs[name] = dir .. "/" .. file
  end
  return certs
end

-- Copies src to dst through a temporary file and a rename, so that dst is never partial.
local function install(src, dst)
  local text = assert(H.read_file(src), "cannot read " .. src)
  H.write_file(dst .. ".tmp", text)
  assert(os.rename(dst .. ".tmp", dst))
end

-- tls.broker(certs, opts) -> node. A private node (H.broker_node) that also listens for AMQPS
-- with certs.ca as its CA and the server certificate opts.cert (default "server"; or "expired",
-- "wronghost": a key prefix of certs). It asks clients for a certificate without requiring one
-- and offers EXTERNAL (user = the client certificate's CN) besides PLAIN and AMQPLAIN.
-- opts.env: more variables for scripts/broker start (e.g. WARREN_BROKER_CONF).
--   node.url, node.dir, node:ctl(...), node:stop()   as for H.broker_node
--   node.tls_url    amqps://guest:guest@localhost:PORT (guest may log in: it is on loopback)
--   node.tls_port   PORT
--   node.tls_dir    the directory the listener reads ca.pem, server.pem and server.key from
--   node:use_cert(name)  shows the server certificate certs[name] (with certs[name .. "_key"])
--                        from the next handshake on
function tls.broker(certs, opts)
  opts = opts or {}
  local tls_dir = H.tmpdir()
  install(certs.ca, tls_dir .. "/ca.pem")
  local name = opts.cert or "server"
  install(assert(certs[name], "no certificate " .. name), tls_dir .. "/server.pem")
  install(certs[name .. "_key"], tls_dir .. "/server.key")
  local env = { WARREN_BROKER_TLS = tls_dir }
  for k, v in pairs(opts.env or {}) do
    env[k] = v
  end
  local node = H.broker_node(env)
  node.certs, node.tls_dir = certs, tls_dir
  local code, out, err = node:script("tls-url")
  if code ~= 0 then
    pcall(node.stop, node)
    error("scripts/broker tls-url: " .. out .. err)
  end
  node.tls_url = out:match("^(%S+)")
  node.tls_port = tonumber(node.tls_url:match(":(%d+)$"))

  function node.use_cert(self, cert)
    install(assert(self.certs[cert], "no certificate " .. cert), self.tls_dir .. "/server.pem")
    install(self.certs[cert .. "_key"], self.tls_dir .. "/server.key")
    local ok, output = self:ctl("eval", "ssl:clear_pem_cache().")
    assert(ok, "clearing the PEM cache failed: " .. output)
  end
  return node
end

return tls
