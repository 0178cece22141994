"""The engine end to end: real provisioner(s), real nodes, mTLS overlay brokers, KV jobs."""

from __future__ import annotations

import time

import pytest
from cryptography import x509

from node_agent.node import NodeAgent
from provisioner.config import ElectionConfig
from provisioner.fleetops.model import Job, JobSpec, JobState, Target, TargetState, new_job_id
from provisioner.service import Provisioner
from tests.provisioner.fleetops.fleet import Fleet, overlay_of
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


def _serial(node: NodeAgent) -> int:
    pem = (node.ssldir / "certificate.pem").read_bytes()
    return int(x509.load_pem_x509_certificate(pem).serial_number)


async def _final(prov: Provisioner, job_id: str, timeout: float) -> Job:
    async def ended() -> bool:
        return (await prov.fleetops.job(job_id)).final

    await async_wait_for(ended, timeout, interval=0.2)
    return await prov.fleetops.job(job_id)


def _spec(prov: Provisioner, nodes: list[NodeAgent], rate: float) -> JobSpec:
    targets = [{"identity": n.identity, "overlay": overlay_of(prov, n)} for n in nodes]
    return JobSpec(kind="reprovision", targets=targets, rate=rate, backoff=0.5)


async def test_reprovision_two_nodes_through_their_overlays(fleet: Fleet) -> None:
    prov = await fleet.provisioner()
    await prov.start()
    nodes = await fleet.provisioned_nodes(prov, 3)
    assert all(n.boots == 2 for n in nodes)  # provisioning mode, then normal mode
    serials = {n.identity: _serial(n) for n in nodes}
    picked, left = nodes[:2], nodes[2]

    plan = prov.fleetops.plan(_spec(prov, picked, rate=30))
    assert [t["identity"] for t in plan["targets"]] == [n.identity for n in picked]
    assert [t["at"] for t in plan["targets"]] == [0.0, 2.0]

    job = await prov.fleetops.create(_spec(prov, picked, rate=30))
    done = await _final(prov, job.id, 60)
    assert done.state == JobState.DONE, done.targets
    assert [(t.state, t.attempts) for t in done.targets] == [("done", 1), ("done", 1)]

    # Each picked node went back to provisioning mode and was provisioned again: a new
    # certificate, back in normal mode on an overlay. The third was never asked.
    async def back() -> bool:
        return all(n.boots == 4 and n.mode == "normal" and n.ready for n in picked)

    await async_wait_for(back, 60)
    for n in picked:
        assert _serial(n) != serials[n.identity]
    assert left.boots == 2 and _serial(left) == serials[left.identity]
    assert fleet.log.count("reprovision") == {n.identity: 1 for n in picked}

    # Paced at 30 nodes/minute: the second request no earlier than ~2 s after the first.
    first, second = (t.sent_at or 0.0 for t in done.targets)
    assert second - first >= 1.5
    value = prov.registry.get_sample_value(
        "choria_provisioner_job_requests_total", {"site": "test", "kind": "reprovision"}
    )
    assert value == 2


async def test_wrong_token_fails_without_retrying(fleet: Fleet) -> None:
    prov = await fleet.provisioner()
    await prov.start()
    nodes = await fleet.provisioned_nodes(prov, 1)
    prov.fleetops.ctx.token = "not-the-fleet-token"  # the node's check is the point
    job = await prov.fleetops.create(_spec(prov, nodes, rate=600))
    ended = await _final(prov, job.id, 30)
    assert ended.state == JobState.FAILED
    target = ended.targets[0]
    assert target.state == TargetState.FAILED and target.attempts == 1
    assert "Incorrect provision token" in (target.last_error or "")
    assert "not-the-fleet-token" not in ended.model_dump_json()
    assert nodes[0].boots == 2


async def test_running_targets_are_confirmed_on_resume_not_resent(fleet: Fleet) -> None:
    """A leader died between writing ``running`` and recording the answer."""
    prov = await fleet.provisioner()
    await prov.start()
    acted, never = await fleet.provisioned_nodes(prov, 2)
    assert prov.fleetops.store is not None
    # ``acted`` got its request (sent here by hand through the engine's own overlay client)
    # and restarted; ``never`` was marked running a while ago but the request never left.
    rpc = await prov.fleetops.connections.client(overlay_of(prov, acted))
    sent_at = time.time()
    reply = await rpc.request_once(
        acted.identity, "choria_provision", "reprovision", {"token": fleet.stack.token}, 10
    )
    assert reply.ok
    prov.fleetops.ctx.expect_back(acted.identity)  # as the engine does on an answer
    job = Job(
        id=new_job_id(),
        kind="reprovision",
        rate=600,
        backoff=0.5,
        targets=[
            Target(
                identity=acted.identity,
                overlay=overlay_of(prov, acted),
                state=TargetState.RUNNING,
                attempts=1,
                sent_at=sent_at,
            ),
            Target(
                identity=never.identity,
                overlay=overlay_of(prov, never),
                state=TargetState.RUNNING,
                attempts=1,
                # after its provisioning; the runner waits the restart grace, then re-sends
                sent_at=time.time(),
            ),
        ],
    )
    await prov.fleetops.store.create(job)
    prov.fleetops.runner.wake()  # type: ignore[union-attr]
    ended = await _final(prov, job.id, 90)
    assert ended.state == JobState.DONE, ended.targets
    by_id = {t.identity: t for t in ended.targets}
    assert by_id[acted.identity].attempts == 1 and by_id[acted.identity].reason == "confirmed"
    assert by_id[never.identity].attempts == 2
    # exactly one request each: the hand-sent one, and the re-send to the node that never got it
    assert fleet.log.count("reprovision") == {acted.identity: 1, never.identity: 1}


async def test_failover_resumes_without_resending_done_targets(fleet: Fleet) -> None:
    election = ElectionConfig(bucket="FLEETOPS_ELECTION", ttl=2.0, campaign_interval=0.2)
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
    epoch_a = a.leadership.epoch()
    # 12 nodes/minute: one request every 5 s, time enough to stop the leader in between.
    job = await a.fleetops.create(_spec(a, nodes, rate=12))

    async def one_done() -> bool:
        j = await a.fleetops.job(job.id)
        return j.counts()["done"] >= 1

    await async_wait_for(one_done, 30, interval=0.1)
    await a.stop()  # the leader goes away mid-job
    await async_wait_for(lambda: b.leader, 20)
    ended = await _final(b, job.id, 90)
    assert ended.state == JobState.DONE, ended.targets
    assert ended.epoch > epoch_a
    # every node asked exactly once, across both leaders
    assert fleet.log.count("reprovision") == {n.identity: 1 for n in nodes}
    await async_wait_for(lambda: all(n.boots == 4 and n.mode == "normal" for n in nodes), 60)
