"""The same node scenario over both transports (nats-py and the lean client), through the auth
callout over TLS: what the broker sees (connection name, subscriptions) and what the
provisioner gets back must not depend on the transport."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from jwt_tools import create_provisioning_token
from node_agent.leannats import LeanConnection
from node_agent.node import NodeAgent, Transport
from testbed.natsserver import NatsServer
from tests.node_agent.client import TOKEN, EventLog, ProvClient
from tests.node_agent.pki import ThrowawayCA
from tests.node_agent.provision import plain_server
from tests.support import async_wait_for, missing_dependency

pytestmark = pytest.mark.integration

P = "choria_provision"


def _connz(server: NatsServer) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{server.monitor_port}/connz?subs=1&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return list(json.load(resp)["connections"])


async def _seen(server: NatsServer, name: str) -> dict[str, Any]:
    """The broker's view of the connection named ``name`` (waits until there is one)."""
    found: list[dict[str, Any]] = []

    async def _one() -> bool:
        conns = await asyncio.to_thread(_connz, server)
        found[:] = [c for c in conns if c.get("name") == name]
        return len(found) == 1

    await async_wait_for(_one, 10)
    return found[0]


@pytest.mark.parametrize("transport", ["nats-py", "lean"])
async def test_node_scenario_is_the_same_over_both_transports(
    transport: Transport, tmp_path: Path
) -> None:
    try:
        from testbed.isolated_broker import start_isolated_broker
    except ImportError as exc:  # another contributor's module
        missing_dependency("testbed.isolated_broker", f"it failed to import: {exc}")
        raise
    identity = f"conf-{transport}.example.net"
    key = ed25519.Ed25519PrivateKey.generate()
    broker = await start_isolated_broker(tmp_path / "broker", [key.public_key()], tls=True)
    overlay = plain_server(tmp_path / "overlay")
    ca = ThrowawayCA.create()
    async with broker:
        token = tmp_path / "provisioning.jwt"
        token.write_text(create_provisioning_token(key, token=TOKEN, urls=[broker.url]))
        # no tls_ca: anonymous TLS, as go-choria connects in provisioning mode
        node = NodeAgent(
            identity=identity,
            token_path=token,
            state_dir=tmp_path / "state",
            key_type="ec",
            restart_delay_scale=0.01,
            durable=False,
            transport=transport,
        )
        nc = await nats.connect(**broker.provisioner_connect_options())
        overlay_nc = await nats.connect(overlay.url)
        try:
            events = await EventLog.watch(nc, "choria.lifecycle.event.*.*")
            overlay_events = await EventLog.watch(overlay_nc, "choria.lifecycle.event.*.*")
            client = await ProvClient.attach(nc, "provisioning")
            await node.start()
            assert isinstance(node._link, LeanConnection) is (transport == "lean")

            seen = await _seen(broker.server, identity)
            assert sorted(seen["subscriptions_list"]) == sorted(
                [f"provisioning.node.{identity}"]
                + [
                    f"provisioning.broadcast.agent.{a}"
                    for a in ("discovery", "rpcutil", "choria_util", "choria_provision")
                ]
            )
            assert seen.get("tls_version"), seen  # the provisioning link is TLS
            await async_wait_for(lambda: bool(events.of("startup", identity)), 5)
            assert events.of("startup", identity)[0].component == "provision_mode_server"

            assert await client.discover(window=2, expect=1) == [identity]
            jwt = await client.rpc(identity, P, "jwt", {"token": TOKEN})
            assert jwt is not None and jwt.statuscode == 0
            assert jwt.data["jwt"] == token.read_text()
            bad = await client.rpc(identity, P, "jwt", {"token": "wrong"})
            assert bad is not None and bad.statuscode != 0
            csr_reply = await client.rpc(identity, P, "gencsr", {"token": TOKEN}, timeout=10)
            assert csr_reply is not None and csr_reply.statuscode == 0, csr_reply
            public_key = x509.load_pem_x509_csr(csr_reply.data["csr"].encode()).public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            ssldir = csr_reply.data["ssldir"]
            config = {
                "identity": identity,
                "plugin.choria.server.provision": "false",
                "plugin.choria.middleware_hosts": overlay.url,
                "collectives": "choria",
            }
            conf = await client.rpc(
                identity,
                P,
                "configure",
                {
                    "token": TOKEN,
                    "config": json.dumps(config),
                    "certificate": ca.sign(public_key, identity),
                    "ca": ca.pem,
                    "ssldir": ssldir,
                },
            )
            assert conf is not None and conf.statuscode == 0, conf
            assert (Path(ssldir) / "certificate.pem").is_file()
            restart = await client.rpc(identity, P, "restart", {"token": TOKEN, "splay": 1})
            assert restart is not None and restart.statuscode == 0
            await node.wait_normal(15)

            normal = await _seen(overlay, identity)
            assert sorted(normal["subscriptions_list"]) == sorted(
                [f"choria.node.{identity}"]
                + [
                    f"choria.broadcast.agent.{a}"
                    for a in ("discovery", "rpcutil", "choria_util", "choria_provision")
                ]
            )
            await async_wait_for(lambda: bool(overlay_events.of("startup", identity)), 5)
            assert overlay_events.of("startup", identity)[0].component == "server"
            # the provisioning connection is gone once the node runs in normal mode
            gone = await asyncio.to_thread(_connz, broker.server)
            assert not [c for c in gone if c.get("name") == identity]
            assert len(events.of("provisioned", identity)) == 1
            assert len(events.of("shutdown", identity)) == 1
        finally:
            await node.stop()
            await nc.close()
            await overlay_nc.close()
            overlay.stop()
