"""The fleet simulator: 1,000 nodes answering discovery, worker processes, shared connections."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import psutil
import pytest

from node_agent.facts import synthetic_facts, synthetic_identity
from testbed.fleet import Fleet
from testbed.natsserver import NatsServer
from tests.node_agent.client import ProvClient, write_token
from tests.node_agent.provision import HandProvisioner, plain_server

pytestmark = pytest.mark.integration


def _connections(server: NatsServer) -> int:
    url = f"http://127.0.0.1:{server.monitor_port}/connz"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(json.load(resp)["num_connections"])


async def test_thousand_nodes_answer_discovery(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    rss_before = psutil.Process().memory_info().rss
    fleet = Fleet(1000, token, None, tmp_path / "fleet", key_type="ec")
    client = await ProvClient.connect(nats_server)
    try:
        await fleet.start()
        assert fleet.counts()["provisioning"] == 1000
        rss_after = psutil.Process().memory_info().rss
        found = await client.discover(window=2.0, expect=1000)
        assert len(set(found)) == 1000
        assert set(found) == set(fleet.identities())
        assert _connections(nats_server) == 1001  # one connection per node + the client
        with capsys.disabled():
            print(
                f"\n[fleet] 1000 nodes: RSS {rss_after / 1e6:.0f} MB, "
                f"{(rss_after - rss_before) / 1000 / 1024:.0f} KiB per node"
            )
    finally:
        await client.close()
        await fleet.stop()
    assert fleet.counts()["stopped"] == 1000


async def test_worker_processes_report_counts(nats_server: NatsServer, tmp_path: Path) -> None:
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    fleet = Fleet(60, token, None, tmp_path / "fleet", processes=2, seed=7)
    client = await ProvClient.connect(nats_server)
    try:
        await fleet.start()
        assert fleet.counts()["provisioning"] == 60 and fleet.counts()["total"] == 60
        assert fleet.rss_bytes() > 0
        found = await client.discover(window=2.0, expect=60)
        assert sorted(set(found)) == fleet.identities()
        # facts are the deterministic synthetic ones, whichever process runs the node
        r = await client.rpc(synthetic_identity(42), "rpcutil", "inventory")
        assert r is not None and r.data["facts"] == json.loads(json.dumps(synthetic_facts(42, 7)))
    finally:
        await client.close()
        await fleet.stop()


async def test_shared_connections(nats_server: NatsServer, tmp_path: Path) -> None:
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    fleet = Fleet(300, token, None, tmp_path / "fleet", connections="shared", start_index=1000)
    client = await ProvClient.connect(nats_server)
    try:
        await fleet.start()
        assert _connections(nats_server) == 2  # one shared connection + the client
        found = await client.discover(window=2.0, expect=300)
        assert sorted(set(found)) == fleet.identities()
        r = await client.rpc(synthetic_identity(1123), "rpcutil", "ping")
        assert r is not None and r.statuscode == 0
    finally:
        await client.close()
        await fleet.stop()


async def test_fleet_reaches_normal_mode(nats_server: NatsServer, tmp_path: Path) -> None:
    overlay = plain_server(tmp_path / "overlay")
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    fleet = Fleet(5, token, None, tmp_path / "fleet", restart_delay_scale=0.01)
    prov = await HandProvisioner.start(nats_server, overlay)
    try:
        await fleet.start()
        try:
            await fleet.wait_all_normal(20)
        except TimeoutError as exc:
            modes = {n.identity: (n.mode, n.stats) for n in fleet.local_nodes}
            raise AssertionError(f"{exc}; errors={prov.errors}; nodes={modes}") from exc
        assert fleet.counts()["normal"] == 5
        assert sorted(prov.done) == fleet.identities()
    finally:
        await prov.stop()
        await fleet.stop()
        overlay.stop()


@pytest.mark.parametrize(("env", "lean"), [(None, True), ("nats-py", False)])
async def test_fleet_transport_defaults_to_the_lean_client(
    nats_server: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    lean: bool,
) -> None:
    from node_agent.leannats import LeanConnection
    from testbed.fleet import TRANSPORT_ENV

    if env is None:
        monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    else:
        monkeypatch.setenv(TRANSPORT_ENV, env)
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    fleet = Fleet(20, token, None, tmp_path / "fleet", key_type="ec")
    client = await ProvClient.connect(nats_server)
    try:
        await fleet.start()
        links = [n._link for n in fleet.local_nodes]
        assert all(isinstance(link, LeanConnection) is lean for link in links)
        assert set(await client.discover(window=1.0, expect=20)) == set(fleet.identities())
        assert _connections(nats_server) == 21  # still one connection per node
    finally:
        await client.close()
        await fleet.stop()
    assert fleet.counts()["stopped"] == 20


async def test_counts_are_kept_by_the_nodes_not_walked(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count report is O(1): the nodes keep their fleet's tally as their mode changes, so
    ``counts()`` (4 times a second in every worker) never walks 50,000 nodes."""
    import testbed.fleet as fleet_mod

    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    fleet = Fleet(40, token, None, tmp_path / "fleet", connections="shared")
    try:
        await fleet.start()
        walked = fleet_mod.count_modes(fleet.local_nodes)

        def _no_walk(*_: object, **__: object) -> dict[str, int]:
            raise AssertionError("counts() walked every node")

        monkeypatch.setattr(fleet_mod, "count_modes", _no_walk)
        assert fleet.counts() == walked
        assert fleet.counts()["provisioning"] == 40 and fleet.counts()["total"] == 40
        node = fleet.local_nodes[3]
        node.mode = "normal"  # what a restart into normal mode does
        assert fleet.counts()["provisioning"] == 39 and fleet.counts()["normal"] == 1
        node.mode = "normal"  # setting the same mode again counts once
        assert fleet.counts()["normal"] == 1
    finally:
        await fleet.stop()
    assert fleet.counts()["stopped"] == 40 and fleet.counts()["provisioning"] == 0


async def test_nodes_make_their_facts_when_asked(nats_server: NatsServer, tmp_path: Path) -> None:
    """Simulated nodes hold no facts dict (100,000 of them cost memory and start time); the
    inventory still answers the deterministic synthetic facts."""
    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    fleet = Fleet(3, token, None, tmp_path / "fleet", seed=5, start_index=20)
    client = await ProvClient.connect(nats_server)
    try:
        await fleet.start()
        for node in fleet.local_nodes:
            assert node._facts is None  # nothing kept per node
        r = await client.rpc(synthetic_identity(21), "rpcutil", "inventory")
        assert r is not None and r.data["facts"] == json.loads(json.dumps(synthetic_facts(21, 5)))
    finally:
        await client.close()
        await fleet.stop()


async def test_first_node_is_up_before_the_last_node_exists(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Nodes are made as they start: with one start at a time, the first node is up (its
    startup event published) while most of the fleet does not exist yet."""
    from testbed.fleet import FleetSpec, _LocalFleet

    token = write_token(tmp_path / "provisioning.jwt", nats_server)
    spec = FleetSpec(
        start=0,
        count=30,
        token_path=str(token),
        workdir=str(tmp_path / "fleet"),
        connect_concurrency=1,
    )
    local = _LocalFleet(spec)
    seen: list[int] = []
    started = asyncio.get_running_loop().create_task(local.start())
    try:
        while not started.done():
            if local.counts()["provisioning"] >= 1:
                seen.append(len(local.nodes))
                break
            await asyncio.sleep(0)
        await started
        assert seen and seen[0] < 30
        assert len(local.nodes) == 30 and local.counts()["provisioning"] == 30
        assert local.counts()["starting"] == 0
    finally:
        await local.stop()
