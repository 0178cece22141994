"""A full provisioning round by hand: jwt → gencsr → configure → restart → normal mode.

The provisioning broker is the dev nats-server; the node's new home (the overlay broker) is a
second nats-server that requires mutual TLS with certificates from a throwaway CA.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from choria_core import ecdh
from node_agent.node import NodeAgent, Transport
from node_agent.transport import tls_context
from testbed.natsserver import NatsServer, start_nats_server
from tests.node_agent.client import TOKEN, EventLog, ProvClient, write_token
from tests.node_agent.pki import ThrowawayCA, key_pem
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

P = "choria_provision"
IDENTITY = "web-01.eu-west.example.net"


def _overlay(tmp_path: Path, ca: ThrowawayCA) -> NatsServer:
    pki = tmp_path / "overlay-pki"
    cert, key = ca.issue_files(pki, "overlay.example.net", server=True)
    (pki / "ca.pem").write_text(ca.pem)
    ca_file = pki / "ca.pem"
    tls = f'cert_file: "{cert}", key_file: "{key}", ca_file: "{ca_file}", verify: true, timeout: 5'
    # config_text goes through str.format: literal braces are doubled
    text = "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n" + f"tls {{{{ {tls} }}}}\n"
    return start_nats_server(tmp_path / "overlay", config_text=text)


@pytest.mark.parametrize("transport", ["nats-py", "lean"])
async def test_full_provisioning_round(
    nats_server: NatsServer, tmp_path: Path, transport: Transport
) -> None:
    ca = ThrowawayCA.create()
    overlay = _overlay(tmp_path, ca)
    watcher_cert, watcher_key = ca.issue_files(tmp_path / "watcher", "watcher.example.net")
    (tmp_path / "watcher" / "ca.pem").write_text(ca.pem)
    overlay_nc = await nats.connect(
        f"tls://127.0.0.1:{overlay.port}",
        tls=tls_context(ca=tmp_path / "watcher" / "ca.pem", cert=watcher_cert, key=watcher_key),
    )
    overlay_events = await EventLog.watch(overlay_nc)
    prov = await ProvClient.connect(nats_server)
    prov_events = await EventLog.watch(prov.nc)
    state = tmp_path / "node"
    node = NodeAgent(
        identity=IDENTITY,
        token_path=write_token(tmp_path / "provisioning.jwt", nats_server),
        state_dir=state,
        key_type="rsa",  # the go-choria default
        restart_delay_scale=0.01,
        durable=False,
        transport=transport,  # normal mode over mutual TLS with either client
    )
    try:
        await node.start()
        await async_wait_for(lambda: bool(prov_events.of("startup", IDENTITY)), 3)

        jwt = await prov.rpc(IDENTITY, P, "jwt", {"token": TOKEN})
        assert jwt is not None and jwt.statuscode == 0 and jwt.data["ecdh_aead"] is True
        csr_reply = await prov.rpc(IDENTITY, P, "gencsr", {"token": TOKEN}, timeout=10)
        assert csr_reply is not None and csr_reply.statuscode == 0, csr_reply
        csr = x509.load_pem_x509_csr(csr_reply.data["csr"].encode())
        assert isinstance(csr.public_key(), rsa.RSAPublicKey)
        ssldir = Path(csr_reply.data["ssldir"])

        config = {
            "identity": IDENTITY,
            "plugin.choria.server.provision": "false",
            "plugin.choria.middleware_hosts": f"tls://127.0.0.1:{overlay.port}",
            "collectives": "choria",
            "plugin.choria.ssldir": str(ssldir),
        }
        # The CA makes the key; it travels encrypted: first the legacy way, then with the AEAD.
        k1 = ec.generate_private_key(ec.SECP256R1())
        k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for key, aead in ((k1, False), (k2, True)):
            enc, prov_pub = ecdh.encrypt_private_key(
                key_pem(key), jwt.data["ecdh_public"], aead=aead
            )
            assert ecdh.is_legacy_encrypted(enc) is not aead
            r = await prov.rpc(
                IDENTITY,
                P,
                "configure",
                {
                    "token": TOKEN,
                    "config": json.dumps(config),
                    "certificate": ca.sign(key.public_key(), IDENTITY),
                    "ca": ca.pem,
                    "ssldir": str(ssldir),
                    "key": enc,
                    "ecdh_public": prov_pub,
                    "server_jwt": "",
                    "action_policies": {},
                    "opa_policies": {},
                },
            )
            assert r is not None and r.statuscode == 0, r
            assert r.data["message"] == f"Wrote 6 lines to {node.config_path}"
            assert (ssldir / "private.pem").read_bytes() == key_pem(key)  # type keeps its label
            assert stat.S_IMODE((ssldir / "private.pem").stat().st_mode) == 0o600
            assert not (ssldir / "csr.pem").exists()
        assert len(prov_events.of("provisioned", IDENTITY)) == 2

        r = await prov.rpc(IDENTITY, P, "restart", {"token": TOKEN, "splay": 1})
        assert r is not None and r.data == {"message": "Restarting Choria Server after 2s"}
        await node.wait_normal(15)
        await async_wait_for(lambda: bool(overlay_events.of("startup", IDENTITY)), 5)
        assert overlay_events.of("startup", IDENTITY)[0].component == "server"
        shutdown = prov_events.of("shutdown", IDENTITY)
        assert shutdown and shutdown[0].component == "provision_mode_server"
        assert node.connected_url == f"tls://127.0.0.1:{overlay.port}"

        # Normal mode: answers on its production collective, over the mTLS overlay broker.
        prod = await ProvClient.attach(overlay_nc, "choria")
        inv = await prod.rpc(IDENTITY, "rpcutil", "inventory", collective="choria")
        assert inv is not None and inv.data["collectives"] == ["choria"]
        assert "choria_provision" in inv.data["agents"]  # the token is still on disk
        assert await prov.rpc(IDENTITY, "rpcutil", "ping", timeout=0.3) is None

        # ...and reprovision takes it back to provisioning mode.
        r = await prod.rpc(IDENTITY, P, "reprovision", {"token": TOKEN}, collective="choria")
        assert (
            r is not None and r.statuscode == 0 and r.data["message"].startswith("Restarting after")
        )
        await async_wait_for(lambda: len(prov_events.of("startup", IDENTITY)) == 2, 15)
        assert node.mode == "provisioning"
        assert "plugin.choria.server.provision=1" in node.config_path.read_text()
        ping = await prov.rpc(IDENTITY, "rpcutil", "ping")
        assert ping is not None and ping.statuscode == 0
    finally:
        await node.stop()
        await prov.close()
        await overlay_nc.close()
        overlay.stop()
