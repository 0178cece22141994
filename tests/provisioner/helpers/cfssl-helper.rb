#!/usr/bin/env ruby
# frozen_string_literal: true

# A provisioning helper in Ruby, written for this project's tests. It mirrors the behaviour of
# the sample helper choria-io/provisioner ships as docs/static/cfssl-helper.rb (the anchor's
# "Writing a Helper" page); it is our own code, not a copy of that script.
#
# What it does, as that sample does:
#   * reads the whole request JSON from stdin and parses "inventory", which arrives as JSON text;
#   * replies with exactly the keys defer, msg, certificate, ca and configuration;
#   * when the request holds a CSR (csr.csr), pipes it to `cfssl sign -remote <url> -` and treats
#     a non-zero exit status or anything on stderr as a failure; it takes "cert" from cfssl's
#     JSON answer, the CA from a PEM file, and points the file security provider at
#     csr.ssldir (certificate.pem, private.pem, ca.pem, cache);
#   * any signing failure becomes defer: true with msg "cfssl integration failed: <class>: <why>";
#   * always sets identity, registerinterval (300), plugin.choria.middleware_hosts and
#     plugin.choria.registration.file_content.data, and never plugin.choria.server.provision.
#
# The sample hard-codes its site settings; here they come from the environment (the provisioner
# passes only the variables its helper_env names), and the last two are this site's "any other
# settings you wish to set":
#   CFSSL_BIN (cfssl), CFSSL_REMOTE (http://localhost:8888),
#   CFSSL_CA_FILE (/etc/choria-provisioner/ca.pem), CHORIA_BROKERS (broker.example.net:4222),
#   CHORIA_NATS_USER and CHORIA_NATS_PASS_FILE (optional login for the node on its broker).

require "json"
require "open3"

cfssl = ENV.fetch("CFSSL_BIN", "cfssl")
remote = ENV.fetch("CFSSL_REMOTE", "http://localhost:8888")
ca_file = ENV.fetch("CFSSL_CA_FILE", "/etc/choria-provisioner/ca.pem")
brokers = ENV.fetch("CHORIA_BROKERS", "broker.example.net:4222")
register_interval = "300"
registration_data = "/etc/node/metadata.json"

request = JSON.parse($stdin.read)
request["inventory"] = JSON.parse(request["inventory"])

reply = {
  "defer" => false,
  "msg" => "",
  "certificate" => "",
  "ca" => "",
  "configuration" => {}
}
settings = reply["configuration"]
identity = request["identity"]
csr = request["csr"]

# PKI is optional: only a request carrying a CSR is signed.
if csr && csr["csr"]
  begin
    out, err, status = Open3.capture3(cfssl, "sign", "-remote", remote, "-", stdin_data: csr["csr"])
    raise format("Could not sign certificate: %s", err) if !status.success? || !err.empty?

    signed = JSON.parse(out)
    # (the sample's own words, kept so that msg reads the same)
    raise "Did not received a signed certificate from cfssl" unless signed["cert"]

    reply["ca"] = File.read(ca_file)
    reply["certificate"] = signed["cert"]

    ssldir = csr["ssldir"]
    settings["plugin.security.provider"] = "file"
    settings["plugin.security.file.certificate"] = File.join(ssldir, "certificate.pem")
    settings["plugin.security.file.key"] = File.join(ssldir, "private.pem")
    settings["plugin.security.file.ca"] = File.join(ssldir, "ca.pem")
    settings["plugin.security.file.cache"] = File.join(ssldir, "cache")
  rescue StandardError => e
    reply["defer"] = true
    reply["msg"] = format("cfssl integration failed: %s: %s", e.class, e.message)
  end
end

settings["identity"] = identity
settings["registerinterval"] = register_interval
settings["plugin.choria.middleware_hosts"] = brokers
settings["plugin.choria.registration.file_content.data"] = registration_data

nats_user = ENV.fetch("CHORIA_NATS_USER", "")
unless nats_user.empty?
  settings["plugin.nats.user"] = nats_user
  settings["plugin.nats.pass"] = File.read(ENV.fetch("CHORIA_NATS_PASS_FILE")).strip
end

puts reply.to_json
