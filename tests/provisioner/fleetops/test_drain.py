"""Drains that execute, end to end: real provisioner(s), real nodes, mTLS overlay brokers.

Every node starts in ``eu-west-1`` (the other overlays cordoned), then ``eu-west-1`` is set
``draining`` and the other overlays opened with small capacities: the ``drain`` job moves each
node through re-provisioning, the reference helper (which follows the registry file) places it
elsewhere within capacity, and the node ends up connected to its new overlay's broker.
"""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from node_agent.node import NodeAgent
from provisioner.config import ElectionConfig
from provisioner.fleetops.drain import drain_spec
from provisioner.fleetops.model import Job, JobState, TargetState
from provisioner.service import Provisioner
from tests.provisioner.fleetops.fleet import Fleet, overlay_of
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

DRAINED = "eu-west-1"
#: After the drain opens them: room for exactly the nodes that leave (4).
CAPACITY_AFTER = {"eu-west-2": 1, "us-east-1": 2, "ap-south-1": 1}


def _registry(fleet: Fleet, states: dict[str, str], capacity: dict[str, int]) -> None:
    doc = yaml.safe_load(fleet.overlays_path.read_text())
    for ov in doc["overlays"]:
        ov["state"] = states.get(ov["name"], "active")
        if ov["name"] in capacity:
            ov["capacity"] = capacity[ov["name"]]
    fleet.overlays_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _all_in_drained(fleet: Fleet) -> None:
    others = {name: "cordoned" for name in CAPACITY_AFTER}
    _registry(fleet, others, {})


def _open_drain(fleet: Fleet) -> None:
    _registry(fleet, {DRAINED: "draining"}, CAPACITY_AFTER)


def _overlay_connected(fleet: Fleet, node: NodeAgent) -> str:
    by_url = {ob.url: name for name, ob in fleet.stack.overlay_brokers.items()}
    return by_url.get(node.connected_url, "")


async def _final(prov: Provisioner, job_id: str, timeout: float) -> Job:
    async def ended() -> bool:
        return (await prov.fleetops.job(job_id)).final

    await async_wait_for(ended, timeout, interval=0.2)
    return await prov.fleetops.job(job_id)


async def _moved(fleet: Fleet, nodes: list[NodeAgent], timeout: float) -> Counter[str]:
    """Wait for every node to be back in normal mode on another overlay; where they are."""

    def settled() -> bool:
        return all(
            n.boots == 4 and n.mode == "normal" and n.ready and _overlay_connected(fleet, n)
            for n in nodes
        )

    await async_wait_for(settled, timeout)
    return Counter(_overlay_connected(fleet, n) for n in nodes)


def _check_placement(where: Counter[str], total: int) -> None:
    assert sum(where.values()) == total
    assert where[DRAINED] == 0, where
    for name, n in where.items():
        assert n <= CAPACITY_AFTER[name], f"{name} holds {n} > capacity {CAPACITY_AFTER[name]}"


async def test_drain_moves_every_node_out_within_capacity(fleet: Fleet) -> None:
    _all_in_drained(fleet)
    prov = await fleet.provisioner()
    await prov.start()
    nodes = await fleet.provisioned_nodes(prov, 4)
    assert {overlay_of(prov, n) for n in nodes} == {DRAINED}
    idents = [n.identity for n in nodes]

    # Not draining yet: the job refuses every target without asking any node (placement
    # could put it straight back).
    refused = await _final(prov, (await prov.fleetops.create(drain_spec(DRAINED, idents))).id, 30)
    assert refused.state == JobState.FAILED
    assert all(t.state == TargetState.FAILED for t in refused.targets)
    assert "not 'draining'" in (refused.targets[0].last_error or "")
    assert fleet.log.count("reprovision") == Counter()

    _open_drain(fleet)
    job = await prov.fleetops.create(drain_spec(DRAINED, idents, rate=600))
    assert job.kind == "drain" and {t.overlay for t in job.targets} == {DRAINED}
    done = await _final(prov, job.id, 60)
    assert done.state == JobState.DONE, done.targets
    assert all(t.attempts == 1 for t in done.targets)

    where = await _moved(fleet, nodes, 60)
    _check_placement(where, len(nodes))
    # The provisioner's records agree with where the nodes connected.
    await async_wait_for(lambda: all(overlay_of(prov, n) != DRAINED for n in nodes), 10)
    assert fleet.log.count("reprovision") == {i: 1 for i in idents}


async def test_drain_resumes_after_failover_without_reprovisioning_twice(fleet: Fleet) -> None:
    _all_in_drained(fleet)
    election = ElectionConfig(bucket="DRAIN_ELECTION", ttl=2.0, campaign_interval=0.2)
    a = await fleet.provisioner(
        identity="prov-a.fleetops.example.net", leader_election=True, election=election
    )
    b = await fleet.provisioner(
        identity="prov-b.fleetops.example.net", leader_election=True, election=election
    )
    await a.start()
    await async_wait_for(lambda: a.leader, 15)
    await b.start()
    nodes = await fleet.provisioned_nodes(a, 3)
    assert {overlay_of(a, n) for n in nodes} == {DRAINED}
    _open_drain(fleet)
    epoch_a = a.leadership.epoch()
    # 12 nodes/minute: one request every 5 s, time enough to stop the leader in between.
    job = await a.fleetops.create(drain_spec(DRAINED, [n.identity for n in nodes], rate=12))

    async def one_done() -> bool:
        return (await a.fleetops.job(job.id)).counts()["done"] >= 1

    await async_wait_for(one_done, 30, interval=0.1)
    await a.stop()  # the leader goes away mid-drain
    await async_wait_for(lambda: b.leader, 20)
    ended = await _final(b, job.id, 90)
    assert ended.state == JobState.DONE, ended.targets
    assert ended.epoch > epoch_a
    # every node asked exactly once, across both leaders (counted on the overlay brokers)
    assert fleet.log.count("reprovision") == {n.identity: 1 for n in nodes}
    # Out of the drained overlay. (Capacity is the first test's: here each replica's in-process
    # helper keeps its own memory ledger; replicas share capacity through the KV ledger.)
    where = await _moved(fleet, nodes, 60)
    assert where[DRAINED] == 0 and sum(where.values()) == len(nodes), where
