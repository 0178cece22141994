"""The node in provisioning mode over a real nats-server, driven by wire-layer requests."""

from __future__ import annotations

import base64
import json
import logging
import re
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from choria_core import ecdh
from choria_core.natsconn import sync_flush
from choria_core.protocol import Filter, StatusCode, directed_subject, encode_rpc_request
from node_agent.node import NodeAgent, NodeError
from testbed.natsserver import NatsServer, default_accounts, start_nats_server
from tests.node_agent.client import TOKEN, ProvClient, write_token
from tests.node_agent.conftest import NodeEnv
from tests.node_agent.pki import ThrowawayCA
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

P = "choria_provision"


# --- startup, discovery, request checks --------------------------------------------------------


async def test_startup_event_and_discovery(node_env: NodeEnv) -> None:
    env = node_env
    await async_wait_for(lambda: bool(env.events.of("startup", env.identity)), 2)
    ev = env.events.of("startup", env.identity)[0]
    assert ev.component == "provision_mode_server" and ev.version == "0.29.4"
    subjects = [s for s, e in env.events.events if e.identity == env.identity]
    assert subjects[0] == "choria.lifecycle.event.startup.provision_mode_server"
    flt = Filter(agent=("choria_provision",), identity=(env.identity,))
    assert await env.client.discover(window=1, flt=flt, expect=1) == [env.identity]


async def test_startup_event_is_cloudevents(shared_nats_server: NatsServer, tmp_path: Path) -> None:
    client = await ProvClient.connect(shared_nats_server)
    raw: list[bytes] = []

    async def _cb(msg: object) -> None:
        raw.append(msg.data)  # type: ignore[attr-defined]

    await client.nc.subscribe("choria.lifecycle.event.startup.provision_mode_server", cb=_cb)
    await sync_flush(client.nc)
    node = NodeAgent(
        identity="cloudevents.example.net",
        token_path=write_token(tmp_path / "t.jwt", shared_nats_server),
        state_dir=tmp_path / "s",
    )
    await node.start()
    try:
        await async_wait_for(lambda: bool(raw), 2)
        obj = json.loads(raw[0])
        assert obj["specversion"] == "1.0" and obj["source"] == "io.choria.lifecycle"
        assert obj["type"] == "io.choria.lifecycle.v1.startup"
        assert obj["data"]["component"] == "provision_mode_server"
    finally:
        await node.stop()
        await client.close()


async def test_request_checks_drop_silently(node_env: NodeEnv) -> None:
    env, c = node_env, node_env.client
    ok = await c.rpc(env.identity, "rpcutil", "ping")
    assert ok is not None and abs(ok.data["pong"] - time.time()) < 5
    # wrong collective on the node's own subject
    q = await c.send(
        directed_subject("provisioning", env.identity),
        "rpcutil",
        encode_rpc_request("rpcutil", "ping"),
        collective="choria",
    )
    # expired TTL / far future
    old = await c.rpc(
        env.identity, "rpcutil", "ping", ttl=60, now=int(time.time()) - 61, timeout=0.3
    )
    future = await c.rpc(env.identity, "rpcutil", "ping", now=int(time.time()) + 120, timeout=0.3)
    other = await c.rpc(
        env.identity, "rpcutil", "ping", flt=Filter(identity=("someone.else",)), timeout=0.3
    )
    facts = await c.rpc(
        env.identity,
        "rpcutil",
        "ping",
        flt=Filter(fact=({"fact": "a", "operator": "==", "value": "b"},)),
        timeout=0.3,
    )
    mine = await c.rpc(
        env.identity, "rpcutil", "ping", flt=Filter(identity=(f"/^{env.identity[:3]}/",))
    )
    assert q.empty() and old is None and future is None and other is None and facts is None
    assert mine is not None and mine.statuscode == 0
    assert env.node.stats["ttlexpired"] == 2 and env.node.stats["filtered"] >= 3


async def test_discovery_needs_ping(node_env: NodeEnv) -> None:
    c = node_env.client
    q = await c.send(
        directed_subject("provisioning", node_env.identity),
        "discovery",
        "hello",
        base64_payload=True,
    )
    found = await c.discover(window=1, flt=Filter(identity=(node_env.identity,)), expect=1)
    assert found == [node_env.identity]
    assert q.empty()  # "hello" is no ping: no pong


async def test_inventory_fields(node_env: NodeEnv) -> None:
    r = await node_env.client.rpc(node_env.identity, "rpcutil", "inventory")
    assert r is not None and r.statuscode == 0
    assert r.data == {
        "agents": ["choria_provision", "choria_util", "discovery", "rpcutil"],
        "classes": [],
        "collectives": ["provisioning"],
        "data_plugins": [],
        "facts": {"region": "eu-west", "cpu_count": 4},
        "machines": [],
        "main_collective": "provisioning",
        "version": "0.29.4",
        "upgradable": False,
    }


@pytest.mark.parametrize("fmt", ["json", "yaml"])
async def test_facts_from_file(shared_nats_server: NatsServer, tmp_path: Path, fmt: str) -> None:
    facts_file = tmp_path / f"facts.{fmt}"
    facts_file.write_text(
        json.dumps({"role": "db", "n": 3}) if fmt == "json" else "role: db\nn: 3\n"
    )
    node = NodeAgent(
        identity=f"facts-{fmt}.example.net",
        token_path=write_token(tmp_path / "t.jwt", shared_nats_server),
        state_dir=tmp_path / "s",
        facts_file=facts_file,
    )
    client = await ProvClient.connect(shared_nats_server)
    await node.start()
    try:
        r = await client.rpc(node.identity, "rpcutil", "get_facts", {"facts": "role,n"})
        inv = await client.rpc(node.identity, "rpcutil", "inventory")
        assert r is not None and r.data == {"values": {"role": "db", "n": 3}}
        assert inv is not None and inv.data["facts"] == {"role": "db", "n": 3}
    finally:
        await node.stop()
        await client.close()


async def test_bad_bodies_and_unknown_actions(node_env: NodeEnv) -> None:
    env, c = node_env, node_env.client
    r = await c.raw_rpc(env.identity, P, '{"agent":"choria_provision"}')
    assert r is not None and r.statuscode == StatusCode.INVALID_DATA
    assert r.statusmsg.startswith("Could not process request")
    r = await c.rpc(env.identity, P, "frobnicate", {"token": TOKEN})
    assert r is not None and r.statuscode == StatusCode.UNKNOWN_ACTION
    assert r.statusmsg == "Unknown action frobnicate for agent choria_provision"
    r = await c.rpc(env.identity, P, "jwt", {"token": 12345})
    assert r is not None and r.statuscode == StatusCode.INVALID_DATA
    assert r.statusmsg.startswith("Could not parse request data for choria_provision#jwt")
    r = await c.rpc(env.identity, P, "restart", {"token": TOKEN, "splay": 1.5})
    assert r is not None and r.statuscode == StatusCode.INVALID_DATA
    r = await c.rpc(env.identity, P, "configure", {"token": TOKEN, "action_policies": ["x"]})
    assert r is not None and r.statuscode == StatusCode.INVALID_DATA
    assert await c.rpc(env.identity, "no_such_agent", "x", timeout=0.3) is None


# --- jwt, lock, gen25519, gencsr ----------------------------------------------------------------


async def test_jwt_token_checks_and_no_token_in_logs(
    node_env: NodeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env, c = node_env, node_env.client
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-value-xyz"
    for data in ({"token": wrong}, {}):
        r = await c.rpc(env.identity, P, "jwt", data)
        assert r is not None and r.statuscode == StatusCode.ABORTED
        assert r.statusmsg == "Incorrect provision token supplied"
    assert wrong not in caplog.text and TOKEN not in caplog.text
    r = await c.rpc(env.identity, P, "jwt", {"token": TOKEN})
    assert r is not None and r.statuscode == 0, r
    assert r.data["jwt"] == env.token_path.read_text().strip()
    assert len(r.data["ecdh_public"]) == 64 and r.data["ecdh_aead"] is True
    again = await c.rpc(env.identity, P, "jwt", {"token": TOKEN})
    assert again is not None and again.data["ecdh_public"] != r.data["ecdh_public"]  # fresh key


async def test_provisioning_lock(node_env: NodeEnv) -> None:
    env = node_env
    other = await ProvClient.connect(env.server, callerid="choria=other.example.net")
    try:
        # a stranger with a wrong token cannot take the lock
        bad = await other.rpc(env.identity, P, "jwt", {"token": "nope"})
        assert bad is not None and bad.statusmsg == "Incorrect provision token supplied"
        first = await env.client.rpc(env.identity, P, "jwt", {"token": TOKEN})
        assert first is not None and first.statuscode == 0
        locked = await other.rpc(env.identity, P, "jwt", {"token": TOKEN})
        assert locked is not None and locked.statuscode == StatusCode.ABORTED
        assert locked.statusmsg == "Could not obtain provisioning lock"
        # unlocked actions still work for others
        inv = await other.rpc(env.identity, "rpcutil", "inventory")
        assert inv is not None and inv.statuscode == 0
        # the owner keeps (and extends) the lock
        again = await env.client.rpc(env.identity, P, "gencsr", {"token": TOKEN})
        assert again is not None and again.statuscode == 0
    finally:
        await other.close()


async def test_gen25519(node_env: NodeEnv) -> None:
    env = node_env
    env.state_dir.mkdir(parents=True, exist_ok=True)
    (env.state_dir / "server.jwt").write_text("old.jwt.value")
    nonce = "0123456789abcdef0123456789abcdef"
    r = await env.client.rpc(env.identity, P, "gen25519", {"token": TOKEN, "nonce": nonce})
    assert r is not None and r.statuscode == 0, r
    pub = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(r.data["public_key"]))
    pub.verify(bytes.fromhex(r.data["signature"]), nonce.encode())
    assert r.data["directory"] == str(env.state_dir)
    seed = env.state_dir / "server.seed"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600 and len(seed.read_text()) == 64
    assert not (env.state_dir / "server.jwt").exists()
    r = await env.client.rpc(env.identity, P, "gen25519", {"token": TOKEN, "nonce": ""})
    assert r is not None and r.statuscode == StatusCode.ABORTED


async def test_gencsr(node_env: NodeEnv) -> None:
    env = node_env
    r = await env.client.rpc(
        env.identity, P, "gencsr", {"token": TOKEN, "C": "DE", "ST": "Bavaria", "O": "Acme"}
    )
    assert r is not None and r.statuscode == 0, r
    csr = x509.load_pem_x509_csr(r.data["csr"].encode())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == env.identity
    assert csr.subject.get_attributes_for_oid(NameOID.STATE_OR_PROVINCE_NAME)[0].value == "Bavaria"
    assert isinstance(
        serialization.load_pem_public_key(r.data["public_key"].encode()), ec.EllipticCurvePublicKey
    )
    ssldir = Path(r.data["ssldir"])
    assert ssldir == env.state_dir / "ssl" and stat.S_IMODE(ssldir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssldir / "private.pem").stat().st_mode) == 0o600
    assert (ssldir / "csr.pem").read_text() == r.data["csr"]
    bad = await env.client.rpc(env.identity, P, "gencsr", {"token": TOKEN, "C": "Germany"})
    assert bad is not None and bad.statuscode == StatusCode.ABORTED and "C" in bad.statusmsg
    custom = await env.client.rpc(
        env.identity, P, "gencsr", {"token": TOKEN, "cn": "other.example.net"}
    )
    assert (
        custom is not None
        and "other.example.net"
        in x509.load_pem_x509_csr(custom.data["csr"].encode()).subject.rfc4514_string()
    )


# --- configure ----------------------------------------------------------------------------------


async def test_configure_with_csr_certificate_and_policies(node_env: NodeEnv) -> None:
    env, c = node_env, node_env.client
    csr_reply = await c.rpc(env.identity, P, "gencsr", {"token": TOKEN})
    assert csr_reply is not None and csr_reply.statuscode == 0
    csr = x509.load_pem_x509_csr(csr_reply.data["csr"].encode())
    ca = ThrowawayCA.create()
    key_before = (env.state_dir / "ssl" / "private.pem").read_bytes()
    config = {
        "identity": env.identity,
        "plugin.choria.server.provision": "false",
        "plugin.choria.middleware_hosts": "nats://127.0.0.1:4222",
    }
    r = await c.rpc(
        env.identity,
        P,
        "configure",
        {
            "token": TOKEN,
            "config": json.dumps(config),
            "certificate": ca.sign(csr.public_key(), env.identity),
            "ca": ca.pem,
            "ssldir": csr_reply.data["ssldir"],
            "action_policies": {"rpcutil.policy": "policy default allow\n", "": "skipped"},
            "opa_policies": {"default.rego": "package choria\n"},
            "server_jwt": "a.b.c",
        },
    )
    assert r is not None and r.statuscode == 0, r
    assert r.data == {"message": f"Wrote 4 lines to {env.node.config_path}"}
    lines = env.node.config_path.read_text().splitlines()
    assert lines[0].startswith("# configuration file written in request ")
    assert sorted(lines[1:]) == sorted(f"{k}={v}" for k, v in config.items())
    assert stat.S_IMODE(env.node.config_path.stat().st_mode) == 0o600
    ssl = env.state_dir / "ssl"
    assert (ssl / "private.pem").read_bytes() == key_before  # no key sent: the CSR key stays
    assert (ssl / "ca.pem").read_text() == ca.pem
    pol = env.state_dir / "policies"
    assert stat.S_IMODE((pol / "rpcutil.policy").stat().st_mode) == 0o400
    assert (pol / "rego" / "default.rego").read_text() == "package choria\n"
    assert (env.state_dir / "server.jwt").read_text() == "a.b.c"
    await async_wait_for(lambda: bool(env.events.of("provisioned", env.identity)), 2)
    assert env.events.of("provisioned", env.identity)[0].component == "provision_mode_server"


async def test_configure_refusals_leave_state_intact(node_env: NodeEnv) -> None:
    env, c = node_env, node_env.client
    jwt = await c.rpc(env.identity, P, "jwt", {"token": TOKEN})
    csr_reply = await c.rpc(env.identity, P, "gencsr", {"token": TOKEN})
    assert jwt is not None and csr_reply is not None
    good = {"identity": env.identity, "plugin.choria.middleware_hosts": "nats://127.0.0.1:1"}
    base = {"token": TOKEN, "config": json.dumps(good)}
    r = await c.rpc(env.identity, P, "configure", base)
    assert r is not None and r.statuscode == 0
    before = env.node.config_path.read_bytes()
    ssl = env.state_dir / "ssl"
    snapshot = {p.name: p.read_bytes() for p in ssl.iterdir()}

    ca = ThrowawayCA.create()
    csr = x509.load_pem_x509_csr(csr_reply.data["csr"].encode())
    cert = ca.sign(csr.public_key(), env.identity)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_pem = other_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    tls = {"certificate": cert, "ca": ca.pem, "ssldir": str(ssl)}
    enc, prov_pub = ecdh.encrypt_private_key(other_pem, jwt.data["ecdh_public"], aead=True)
    env_obj = json.loads(enc)
    ct = bytearray(base64.b64decode(env_obj["ct"]))
    ct[0] ^= 0x80
    env_obj["ct"] = base64.b64encode(bytes(ct)).decode()

    cases: list[tuple[dict[str, object], str]] = [
        ({"token": TOKEN, "config": ""}, "Did not receive any configuration to write"),
        ({**base, "key": enc}, "EDCH Public Key not supplied while providing a private key"),
        ({**base, "config": json.dumps({"a": 1})}, "Could not decode configuration data"),
        ({**base, "config": "{not json"}, "Could not decode configuration data"),
        (
            {**base, "config": json.dumps({"identity": "x\nplugin.choria.server.provision=1"})},
            "line break",
        ),
        ({**base, "config": json.dumps({"bad key\nx": "1"})}, "invalid configuration key"),
        ({**base, "action_policies": {"../../evil.policy": "x"}}, "invalid policy file name"),
        ({**base, "opa_policies": {"sub/evil.rego": "x"}}, "invalid policy file name"),
        ({**base, "action_policies": {"evil.sh": "x"}}, "must end in .policy"),
        ({**base, **tls, "ssldir": "/etc/choria/ssl"}, "outside the permitted root"),
        ({**base, **tls, "ssldir": str(ssl / ".." / ".." / "x")}, "outside the permitted root"),
        ({**base, "key": enc, "ecdh_public": prov_pub}, "needs certificate, ca and ssldir"),
        (
            {**base, **tls, "key": json.dumps(env_obj), "ecdh_public": prov_pub},
            "AEAD authentication failed",
        ),
        (
            {**base, **tls, "key": enc, "ecdh_public": prov_pub},
            "certificate does not match the private key",
        ),
        ({**base, **tls, "key": other_pem.decode(), "ecdh_public": prov_pub}, "not encrypted"),
        ({**base, **tls, "key": enc, "ecdh_public": "zz"}, "64 hex"),
        ({**base, **tls, "certificate": "garbage"}, "not valid PEM"),
        ({**base, "server_jwt": "not a jwt"}, "JWT Setup Failed"),
        ({**base, "token": "bad"}, "Incorrect provision token supplied"),
    ]
    for data, message in cases:
        r = await c.rpc(env.identity, P, "configure", data)
        assert r is not None, data
        assert r.statuscode == StatusCode.ABORTED and message in r.statusmsg, (data, r)
        assert env.node.config_path.read_bytes() == before
        assert {p.name: p.read_bytes() for p in ssl.iterdir()} == snapshot
        assert not (env.state_dir / "policies").exists()


# --- restart, shutdown, reprovision, release_update ---------------------------------------------


async def test_restart_refusals(node_env: NodeEnv) -> None:
    env, c = node_env, node_env.client
    r = await c.rpc(env.identity, P, "restart", {"token": TOKEN, "splay": 1})
    assert r is not None and r.statuscode == StatusCode.ABORTED
    assert "could not be parsed, restart cannot continue" in r.statusmsg  # no config yet
    r = await c.rpc(env.identity, P, "restart", {"token": TOKEN, "splay": -1})
    assert (
        r is not None and r.statuscode == StatusCode.ABORTED and "Invalid splay -1" in r.statusmsg
    )
    r = await c.rpc(env.identity, P, "restart", {"token": "bad", "splay": 1})
    assert r is not None and r.statusmsg == "Incorrect provision token supplied"
    for config in (
        {
            "identity": env.identity,
            "plugin.choria.middleware_hosts": "nats://127.0.0.1:1",
            "plugin.choria.server.provision": "true",
        },
        # no provision setting: the token's chpd (true here) decides, so a helper that forgets
        # provision=false makes the node re-provision forever
        {"identity": env.identity, "plugin.choria.middleware_hosts": "nats://127.0.0.1:1"},
    ):
        r = await c.rpc(
            env.identity, P, "configure", {"token": TOKEN, "config": json.dumps(config)}
        )
        assert r is not None and r.statuscode == 0
        r = await c.rpc(env.identity, P, "restart", {"token": TOKEN, "splay": 1})
        assert r is not None and r.statusmsg.endswith(
            "enables provisioning, restart cannot continue"
        )
    assert env.node.mode == "provisioning"


async def test_shutdown_release_update_reprovision(node_env: NodeEnv) -> None:
    env, c = node_env, node_env.client
    r = await c.rpc(env.identity, P, "release_update", {"token": TOKEN, "version": "1.0.0"})
    assert r is not None and r.statuscode == StatusCode.ABORTED
    assert r.statusmsg == "Version updates is not enabled in the configuration"  # no allow_update
    r = await c.rpc(env.identity, P, "reprovision", {"token": TOKEN})
    assert r is not None and r.statusmsg == (
        "Server is already in provisioning mode, cannot enable provisioning mode again"
    )
    r = await c.rpc(env.identity, P, "shutdown", {"token": TOKEN})
    assert r is not None and r.statuscode == 0
    assert r.statusmsg == "OK" and r.data["message"].startswith(
        "Shutting Choria Server down after "
    )
    await async_wait_for(lambda: env.node.mode == "stopped", 2)
    await async_wait_for(lambda: bool(env.events.of("shutdown", env.identity)), 2)
    assert await c.rpc(env.identity, "rpcutil", "ping", timeout=0.3) is None


# --- start-up problems and the CONNECT the node sends ------------------------------------------


async def test_unusable_token_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jwt"
    bad.write_text("not-a-jwt")
    node = NodeAgent(identity="x.example.net", token_path=bad, state_dir=tmp_path / "s")
    with pytest.raises(NodeError, match="unusable provisioning token"):
        await node.start()
    node = NodeAgent(identity="x.example.net", token_path=tmp_path / "missing", state_dir=tmp_path)
    with pytest.raises(NodeError, match="no provisioning token"):
        await node.start()
    with pytest.raises(ValueError, match="invalid node identity"):
        NodeAgent(identity="bad>identity", token_path=bad, state_dir=tmp_path)


async def test_connect_sends_token_user_password_and_name(tmp_path: Path) -> None:
    """nats-server's protocol trace shows the CONNECT: token AND user/pass, name = identity."""
    users = {r: (r, f"pw-{r}") for r in ("provisioner", "node", "choria", "sys")}
    log_file = tmp_path / "trace.log"
    text = (
        "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n"
        f'trace: true\nlogfile: "{log_file}"\n'
        + default_accounts(users).replace("{", "{{").replace("}", "}}")
    )
    server = start_nats_server(tmp_path / "nats", config_text=text, users=users)
    try:
        node = NodeAgent(
            identity="traced.example.net",
            token_path=write_token(tmp_path / "t.jwt", server),
            state_dir=tmp_path / "s",
        )
        await node.start()
        await node.stop()
        connects = [line for line in log_file.read_text().splitlines() if "CONNECT {" in line]
        mine = [line for line in connects if re.search(r'"name":\s*"traced.example.net"', line)]
        assert mine, connects
        assert re.search(r'"auth_token":\s*"', mine[0]) and re.search(r'"user":\s*"node"', mine[0])
        assert re.search(r'"pass":\s*"', mine[0])
    finally:
        server.stop()
