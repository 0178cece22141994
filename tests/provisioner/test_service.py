"""The Provisioner service against real brokers and real node agents."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from provisioner.checks import csr_fingerprint
from provisioner.config import ElectionConfig
from provisioner.metrics import ANCHOR_METRIC_NAMES
from provisioner.queue import NodeState
from provisioner.service import Provisioner, ProvisionerError
from testbed.natsserver import free_port
from tests.provisioner.e2e.env import TOKEN, OverlayWatcher, ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]  # fixtures imported for pytest

pytestmark = pytest.mark.integration


async def test_provisions_a_node_end_to_end(prov_env: ProvEnv, stop_nodes: None) -> None:
    watcher = OverlayWatcher(prov_env.overlay)
    await watcher.start()
    port = free_port()
    prov = prov_env.provisioner(monitor_port=port)
    provisioned: list[str] = []
    prov.on_provisioned.append(lambda rec: provisioned.append(rec.identity))
    await prov.start()
    try:
        node = prov_env.node("web1.example.net")
        await node.start()  # its startup event queues it
        await node.wait_normal(20)
        await async_wait_for(lambda: "web1.example.net" in watcher.seen, 10)
        assert provisioned == ["web1.example.net"]
        rec = prov.node("web1.example.net")
        assert rec is not None and rec["state"] == "provisioned"
        assert set(rec["stage_times"]) >= {
            "jwt",
            "validate",
            "inventory",
            "csr",
            "helper",
            "configure",
            "restart",
        }
        assert rec["source"] == "event"
        prov_env.verify_node_certificate(node)
        # metrics endpoint: the anchor's names, served over HTTP
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in ANCHOR_METRIC_NAMES:
            assert name in body, name
        assert 'choria_provisioner_provisioned{site="test"} 1.0' in body
        assert 'choria_provisioner_event_discovered{site="test"} 1.0' in body
        status = prov.status()
        assert status["counts"]["provisioned"] == 1 and status["ready"] and status["leader"]
    finally:
        await prov.stop()
        await watcher.stop()
    records = prov_env.audit()
    assert len(records) == 1
    rec0 = records[0]
    assert rec0["decision"] == "provisioned" and rec0["identity"] == "web1.example.net"
    assert rec0["token_jti"] and rec0["token_issuer"]
    assert rec0["csr_sha256"] == csr_fingerprint((node.ssldir / "csr.pem").read_text())
    assert len(rec0["inventory_sha256"]) == 64
    assert rec0["cert_serial"] and rec0["cert_not_after"] and rec0["overlay"] == "overlay-test"
    # No secret in the audit log: token, JWT, passwords, private keys.
    text = prov_env.audit_path.read_text()
    secrets = [
        TOKEN,
        prov_env.token_path.read_text().strip(),
        prov_env.server.users["provisioner"][1],
        prov_env.overlay.users["choria"][1],
        "PRIVATE KEY",
        (node.ssldir / "private.pem").read_text().splitlines()[1],
    ]
    for secret in secrets:
        assert secret not in text


async def test_discovery_sweep_finds_nodes_started_before(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    nodes = [prov_env.node(f"early{i}.example.net") for i in range(3)]
    for n in nodes:
        await n.start()  # nobody listens yet: the events are lost
    prov = prov_env.provisioner()
    await prov.start()  # the initial sweep finds them
    try:
        for n in nodes:
            await n.wait_normal(20)
        assert {r["source"] for r in prov.nodes("provisioned")} == {"discovery"}
        assert prov.metrics.discovered.value("test") == 3
    finally:
        await prov.stop()


async def test_pause_and_resume(prov_env: ProvEnv, stop_nodes: None) -> None:
    prov = prov_env.provisioner()
    await prov.start()
    try:
        prov.pause()
        assert prov.status()["paused"]
        assert prov.registry.get_sample_value("choria_provisioner_paused", {"site": "test"}) == 1
        node = prov_env.node("paused1.example.net")
        await node.start()
        await prov.discover_now()  # even a sweep does not start work while paused
        await asyncio.sleep(0.5)
        assert node.mode == "provisioning"
        assert prov.status()["counts"]["provisioned"] == 0
        prov.resume()  # re-subscribes and sweeps
        await node.wait_normal(20)
        assert prov.node("paused1.example.net")["state"] == "provisioned"  # type: ignore[index]
    finally:
        await prov.stop()


async def test_refuses_to_start_without_verify_key(prov_env: ProvEnv) -> None:
    prov = Provisioner(prov_env.config(jwt_verify_cert=""))
    with pytest.raises(ProvisionerError, match="jwt_verify_cert"):
        await prov.start()


async def test_status_views(prov_env: ProvEnv, stop_nodes: None) -> None:
    prov = prov_env.provisioner()
    await prov.start()
    try:
        node = prov_env.node("view1.example.net")
        await node.start()
        await node.wait_normal(20)
        assert prov.nodes(NodeState.PROVISIONED)[0]["identity"] == "view1.example.net"
        assert prov.node("nope.example.net") is None
        tail = prov.audit_tail(None, 10)
        assert tail and tail[-1]["identity"] == "view1.example.net"
        assert prov.overlay_fill() == {"overlay-test": {"count": 1}}
        json.dumps(prov.status())  # JSON friendly
    finally:
        await prov.stop()


def test_env_paths_exist(prov_env: ProvEnv) -> None:
    assert Path(prov_env.ca_dir / "ca.pem").exists()


async def test_leader_election_resumes_the_winner(prov_env: ProvEnv, stop_nodes: None) -> None:
    election = ElectionConfig(bucket="PROV_TEST_ELECTION", ttl=2.0, campaign_interval=0.2)
    first = prov_env.provisioner(leader_election=True, election=election)
    second = prov_env.provisioner(leader_election=True, election=election)
    await first.start()
    await async_wait_for(lambda: first.leader and not first.paused, 10)
    await second.start()
    try:
        node = prov_env.node("elected.example.net")
        await node.start()
        await node.wait_normal(20)
        # only the leader works; the standby stays paused and saw nothing
        assert first.node("elected.example.net")["state"] == "provisioned"  # type: ignore[index]
        assert second.paused and not second.leader
        assert second.node("elected.example.net") is None
    finally:
        await second.stop()
        await first.stop()


async def test_unreachable_broker_is_a_clear_start_error(prov_env: ProvEnv) -> None:
    prov = prov_env.provisioner(broker_urls=[f"nats://127.0.0.1:{free_port()}"])
    with pytest.raises(ProvisionerError, match="could not connect to the broker"):
        await asyncio.wait_for(prov.start(), 30)
    assert not prov.ready()


async def test_survives_a_broker_restart(prov_env: ProvEnv, stop_nodes: None) -> None:
    prov = prov_env.provisioner()
    await prov.start()
    try:
        await asyncio.to_thread(prov_env.server.restart)
        await async_wait_for(prov.ready, 20)
        node = prov_env.node("after-restart.example.net")
        await node.start()
        await node.wait_normal(30)
        assert prov.node("after-restart.example.net")["state"] == "provisioned"  # type: ignore[index]
    finally:
        await prov.stop()
