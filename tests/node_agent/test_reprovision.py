"""``choria_provision#reprovision`` in normal mode, as the fleet operations engine uses it.

The node runs in normal mode on an overlay broker that demands client certificates (a
nats-server with ``verify: true``); the caller reaches it there with its own client
certificate, as the provisioner does with the overlay's ``client:`` identity. Like go-choria,
the node checks the provisioning token, answers, rewrites its configuration to provisioning
mode and restarts into it with the very same provisioning token.
"""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest

from node_agent.node import NodeAgent
from node_agent.transport import tls_context
from testbed.natsserver import NatsServer, start_nats_server
from tests.node_agent.client import TOKEN, EventLog, ProvClient, write_token
from tests.node_agent.pki import ThrowawayCA
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

P = "choria_provision"
IDENTITY = "db-07.eu-west.example.net"


def _mtls_overlay(tmp_path: Path, ca: ThrowawayCA) -> NatsServer:
    pki = tmp_path / "overlay-pki"
    cert, key = ca.issue_files(pki, "overlay.example.net", server=True)
    (pki / "ca.pem").write_text(ca.pem)
    tls = f'cert_file: "{cert}", key_file: "{key}", ca_file: "{pki / "ca.pem"}", verify: true'
    text = "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n" + f"tls {{{{ {tls} }}}}\n"
    return start_nats_server(tmp_path / "overlay", config_text=text)


def _provisioned_state(state: Path, ca: ThrowawayCA, overlay: NatsServer) -> None:
    """What a provisioning round leaves behind: certificate, key, CA and a normal config."""
    ssldir = state / "ssl"
    cert, key = ca.issue_files(ssldir, IDENTITY)
    cert.rename(ssldir / "certificate.pem")
    key.rename(ssldir / "private.pem")
    (ssldir / "ca.pem").write_text(ca.pem)
    (state / "server.conf").write_text(
        "\n".join(
            [
                f"identity={IDENTITY}",
                "plugin.choria.server.provision=false",
                f"plugin.choria.middleware_hosts=tls://127.0.0.1:{overlay.port}",
                "collectives=mcollective",
                f"plugin.choria.ssldir={ssldir}",
                "logfile=/var/log/choria.log",
            ]
        )
        + "\n"
    )


async def _caller(tmp_path: Path, ca: ThrowawayCA, overlay: NatsServer) -> ProvClient:
    """The provisioner's side: its own client certificate on the overlay."""
    cert, key = ca.issue_files(tmp_path / "caller", "provisioner.example.net")
    (tmp_path / "caller" / "ca.pem").write_text(ca.pem)
    nc = await nats.connect(
        f"tls://127.0.0.1:{overlay.port}",
        tls=tls_context(ca=tmp_path / "caller" / "ca.pem", cert=cert, key=key),
    )
    return await ProvClient.attach(nc, "mcollective")


async def test_reprovision_in_normal_mode_checks_the_token_and_goes_back(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    ca = ThrowawayCA.create()
    overlay = _mtls_overlay(tmp_path, ca)
    state = tmp_path / "node"
    _provisioned_state(state, ca, overlay)
    prov = await ProvClient.connect(nats_server)
    prov_events = await EventLog.watch(prov.nc)
    caller = await _caller(tmp_path, ca, overlay)
    node = NodeAgent(
        identity=IDENTITY,
        token_path=write_token(tmp_path / "provisioning.jwt", nats_server),
        state_dir=state,
        restart_delay_scale=0.01,
        durable=False,
        alive_events=False,
    )
    try:
        await node.start()
        assert node.mode == "normal" and node.connected_url.startswith("tls://")
        before = await caller.rpc(IDENTITY, "rpcutil", "daemon_stats", collective="mcollective")
        assert before is not None and before.statuscode == 0
        config_before = node.config_path.read_text()
        started_before = node.started_at

        for data in ({"token": "wrong-token"}, {}, {"token": ""}):
            r = await caller.rpc(IDENTITY, P, "reprovision", data, collective="mcollective")
            assert r is not None and r.statuscode == 1, data
            assert r.statusmsg == "Incorrect provision token supplied"
            assert "wrong-token" not in json.dumps(r.data)
        assert node.mode == "normal" and node.config_path.read_text() == config_before

        r = await caller.rpc(IDENTITY, P, "reprovision", {"token": TOKEN}, collective="mcollective")
        assert r is not None and r.statuscode == 0, r
        assert r.data["message"].startswith("Restarting after")

        # Back in provisioning mode on the token's broker, with the same provisioning token.
        await async_wait_for(lambda: bool(prov_events.of("startup", IDENTITY)), 15)
        assert node.mode == "provisioning"
        assert prov_events.of("startup", IDENTITY)[0].component == "provision_mode_server"
        assert node.provision_token == TOKEN
        config = node.config_path.read_text()
        assert "plugin.choria.server.provision=1" in config
        assert "middleware_hosts" not in config and "ssldir" not in config
        assert "logfile=/var/log/choria.log" in config  # kept, as go-choria does
        stats = await prov.rpc(IDENTITY, "rpcutil", "daemon_stats")
        assert stats is not None and stats.data["starttime"] >= before.data["starttime"]
        assert node.started_at > started_before  # a new "process" (what the engine checks)
        jwt = await prov.rpc(IDENTITY, P, "jwt", {"token": TOKEN})
        assert jwt is not None and jwt.statuscode == 0  # provisionable again
        # ...and no longer on the overlay.
        assert await caller.rpc(IDENTITY, "rpcutil", "ping", timeout=0.5) is None
    finally:
        await node.stop()
        await prov.close()
        await caller.close()
        overlay.stop()


async def test_a_node_without_a_provisioning_token_offers_no_reprovision(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    ca = ThrowawayCA.create()
    overlay = _mtls_overlay(tmp_path, ca)
    state = tmp_path / "node"
    _provisioned_state(state, ca, overlay)
    caller = await _caller(tmp_path, ca, overlay)
    node = NodeAgent(
        identity=IDENTITY,
        token_path=tmp_path / "absent.jwt",
        state_dir=state,
        restart_delay_scale=0.01,
        durable=False,
        alive_events=False,
    )
    try:
        await node.start()
        assert node.mode == "normal"
        inv = await caller.rpc(IDENTITY, "rpcutil", "inventory", collective="mcollective")
        assert inv is not None and P not in inv.data["agents"]
        r = await caller.rpc(
            IDENTITY, P, "reprovision", {"token": TOKEN}, collective="mcollective", timeout=1.0
        )
        assert r is None  # go-choria does not load the agent: nothing answers
        assert node.mode == "normal"
    finally:
        await node.stop()
        await caller.close()
        overlay.stop()
