#!/usr/bin/perl
# A provisioning helper written for choria-io/provisioner, in the style of its documented
# docs/cfssl-helper.rb ("Writing a Helper"), translated to Perl because Ruby is not installed
# here. It reads exactly the documented input keys (identity, csr.csr, csr.ssldir, inventory
# as a JSON *string*), signs the CSR with `cfssl sign -remote`, and prints the documented
# output keys (defer, msg, certificate, ca, configuration). It knows nothing about this
# project: the test proves such a helper works unchanged in exec mode.
#
# Site settings come from the environment (the Ruby original hard-codes them):
#   CFSSL_BIN, CFSSL_REMOTE (host:port), CFSSL_CA_FILE, CHORIA_BROKERS,
#   CHORIA_NATS_USER, CHORIA_NATS_PASS_FILE (optional broker login for the node)
use strict;
use warnings;
use JSON::PP;
use IPC::Open3;
use Symbol 'gensym';

my $cfssl   = $ENV{CFSSL_BIN}      || "cfssl";
my $remote  = $ENV{CFSSL_REMOTE}   || "http://localhost:8888";
my $ca_file = $ENV{CFSSL_CA_FILE}  || "/etc/choria-provisioner/ca.pem";
my $brokers = $ENV{CHORIA_BROKERS} || "broker.example.net:4222";

my $json  = JSON::PP->new->utf8->canonical;
my $input = do { local $/; <STDIN> };

my $request = $json->decode($input);
$request->{inventory} = $json->decode($request->{inventory});

my $reply = {
    "defer"         => JSON::PP::false,
    "msg"           => "",
    "certificate"   => "",
    "ca"            => "",
    "configuration" => {},
};

my $identity         = $request->{identity};
my $registerinterval = "300";

sub read_file {
    my ($path) = @_;
    open(my $fh, "<", $path) or die "cannot read $path: $!\n";
    local $/;
    my $data = <$fh>;
    close($fh);
    return $data;
}

# PKI is optional, if you do enable it in the provisioner this code will kick in
if ($request->{csr} && $request->{csr}{csr}) {
    eval {
        my $err = gensym;
        my $pid = open3(my $in, my $out, $err, $cfssl, "sign", "-remote", $remote, "-");
        print $in $request->{csr}{csr};
        close($in);
        my $stdout = do { local $/; <$out> };
        my $stderr = do { local $/; <$err> };
        waitpid($pid, 0);
        my $status = $? >> 8;
        die sprintf("Could not sign certificate: %s\n", $stderr // "") if $status > 0;

        my $signed = $json->decode($stdout);
        die "Did not received a signed certificate from cfssl\n" unless $signed->{cert};

        $reply->{ca}          = read_file($ca_file);
        $reply->{certificate} = $signed->{cert};

        my $ssldir = $request->{csr}{ssldir};
        my $conf   = $reply->{configuration};
        $conf->{"plugin.security.provider"}         = "file";
        $conf->{"plugin.security.file.certificate"} = "$ssldir/certificate.pem";
        $conf->{"plugin.security.file.key"}         = "$ssldir/private.pem";
        $conf->{"plugin.security.file.ca"}          = "$ssldir/ca.pem";
        $conf->{"plugin.security.file.cache"}       = "$ssldir/cache";
        1;
    } or do {
        my $e = $@ || "unknown error";
        chomp($e);
        $reply->{defer} = JSON::PP::true;
        $reply->{msg}   = "cfssl integration failed: $e";
    };
}

my $conf = $reply->{configuration};
$conf->{"identity"}                       = $identity;
$conf->{"registerinterval"}               = $registerinterval;
$conf->{"plugin.choria.middleware_hosts"} = $brokers;
# The docs' warning: without this the node re-provisions forever (the provisioner refuses).
$conf->{"plugin.choria.server.provision"} = "false";
if ($ENV{CHORIA_NATS_USER}) {
    $conf->{"plugin.nats.user"} = $ENV{CHORIA_NATS_USER};
    my $pass = read_file($ENV{CHORIA_NATS_PASS_FILE});
    $pass =~ s/\s+$//;
    $conf->{"plugin.nats.pass"} = $pass;
}

print $json->encode($reply), "\n";
