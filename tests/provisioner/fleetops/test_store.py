"""The jobs bucket against a real nats-server: create, compare-and-set, resume from KV."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from provisioner.fleetops.model import Job, Target, TargetState, new_job_id
from provisioner.fleetops.store import JobConflict, JobStore, JobStoreError, UnknownJob
from testbed.natsserver import NatsServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[object]:
    user, password = nats_server.users["provisioner"]
    nc = await nats.connect(nats_server.url, user=user, password=password)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def _job(n: int = 3) -> Job:
    return Job(
        id=new_job_id(),
        kind="reprovision",
        rate=60,
        targets=[Target(identity=f"n{i}.example.net", overlay="eu-1") for i in range(n)],
    )


async def test_create_get_list_and_conflict(js: object) -> None:
    store = await JobStore.open(js)
    job = _job()
    await store.create(job)
    again, rev = await store.get(job.id)
    assert again == job and rev > 0
    assert [j.id for j in await store.list()] == [job.id]
    with pytest.raises(JobConflict):
        await store.create(job)
    with pytest.raises(UnknownJob):
        await store.get(new_job_id())
    with pytest.raises(UnknownJob):
        await store.get("../../etc")  # never a key
    # A second store on the same bucket (another replica) sees the same job.
    other = await JobStore.open(js)
    assert (await other.get(job.id))[0] == job


async def test_concurrent_updates_are_never_lost(js: object) -> None:
    store = await JobStore.open(js)
    job = _job(20)
    await store.create(job)

    def finish(identity: str):  # type: ignore[no-untyped-def]
        def change(j: Job) -> Job:
            t = j.target(identity)
            assert t is not None
            t.state = TargetState.DONE
            return j

        return change

    # 20 writers racing on one key: compare-and-set makes each re-read and re-apply.
    await asyncio.gather(*(store.update(job.id, finish(t.identity)) for t in job.targets))
    final, _ = await store.get(job.id)
    assert all(t.state == TargetState.DONE for t in final.targets)


class RacingStore(JobStore):
    """Another writer updates the job right after our first read (a forced, real race)."""

    raced = False

    async def get(self, job_id: str) -> tuple[Job, int]:
        job, rev = await super().get(job_id)
        if not self.raced:
            self.raced = True
            other = job.model_copy(deep=True)
            other.targets[0].attempts = 7
            await self._kv.update(f"job.{job_id}", other.to_json(), last=rev)
        return job, rev


async def test_a_stale_revision_is_refused_and_reapplied(js: object) -> None:
    plain = await JobStore.open(js)
    job = _job(2)
    await plain.create(job)
    store = RacingStore(plain._kv)
    calls: list[int] = []

    def change(j: Job) -> Job:
        calls.append(j.targets[0].attempts)
        j.targets[1].attempts += 1
        return j

    result = await store.update(job.id, change)
    final, _ = await plain.get(job.id)
    # The first write (on the stale revision) was refused; the change was applied again on
    # top of the other writer's, so neither change is lost.
    assert calls == [0, 7]
    assert final == result
    assert (final.targets[0].attempts, final.targets[1].attempts) == (7, 1)


async def test_invalid_documents_are_reported_not_run(js: object) -> None:
    store = await JobStore.open(js)
    good = _job(1)
    await store.create(good)
    bad_id = new_job_id()
    await store._kv.put(f"job.{bad_id}", b'{"id": "' + bad_id.encode() + b'", "kind": 1}')
    assert [j.id for j in await store.list()] == [good.id]
    with pytest.raises(JobStoreError):
        await store.get(bad_id)


async def test_state_survives_a_new_store(js: object) -> None:
    """What a new leader resumes from: the targets' states as the old one wrote them."""
    store = await JobStore.open(js)
    job = _job(3)
    await store.create(job)

    def progress(j: Job) -> Job:
        j.targets[0].state = TargetState.DONE
        j.targets[1].state, j.targets[1].attempts, j.targets[1].sent_at = (
            TargetState.RUNNING,
            1,
            123.0,
        )
        return j

    await store.update(job.id, progress)
    resumed, _ = await (await JobStore.open(js)).get(job.id)
    assert [t.state for t in resumed.targets] == ["done", "running", "pending"]
    assert resumed.targets[1].sent_at == 123.0
