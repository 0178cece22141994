"""Leader election on a real JetStream KV bucket: one leader, graceful and crash failover."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from provisioner.election import Election, ElectionError, read_leader
from testbed.natsserver import NatsServer
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


async def _connect(server: NatsServer) -> nats.NATS:
    user, pw = server.users["provisioner"]
    return await nats.connect(server.url, user=user, password=pw)


async def test_exactly_one_leader_and_graceful_handover(nats_server: NatsServer) -> None:
    ncs = [await _connect(nats_server) for _ in range(3)]
    won: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    elections = [
        Election(
            nc.jetstream(),
            identity=name,
            bucket="T_ELECT",
            ttl=2.0,
            on_won=lambda epoch, n=name: won[n].append(epoch),
        )
        for nc, name in zip(ncs, "abc", strict=True)
    ]
    try:
        for e in elections:
            await e.start()
        await async_wait_for(lambda: sum(e.is_leader for e in elections) == 1, timeout=5)
        await asyncio.sleep(1.5)  # several refresh cycles: still exactly one
        leaders = [e for e in elections if e.is_leader]
        assert len(leaders) == 1
        first = leaders[0]
        info = await read_leader(ncs[0].jetstream(), "T_ELECT")
        assert info is not None and info.identity == first.identity
        assert info.epoch == first.epoch

        t0 = time.monotonic()
        await first.stop()
        rest = [e for e in elections if e is not first]
        await async_wait_for(lambda: any(e.is_leader for e in rest), timeout=5)
        assert time.monotonic() - t0 < 2.0  # graceful: no TTL wait
        second = next(e for e in rest if e.is_leader)
        assert second.epoch > first.epoch  # fencing token increases
        assert won[second.identity] == [second.epoch]
    finally:
        for e in elections:
            await e.stop()
        for nc in ncs:
            await nc.close()


async def test_crashed_leader_expires_after_ttl(nats_server: NatsServer) -> None:
    nc1, nc2 = await _connect(nats_server), await _connect(nats_server)
    lost: list[int] = []
    a = Election(nc1.jetstream(), identity="a", bucket="T_CRASH", ttl=2.0, on_lost=lost.append)
    b = Election(nc2.jetstream(), identity="b", bucket="T_CRASH", ttl=2.0)
    try:
        await a.start()
        await async_wait_for(lambda: a.is_leader, timeout=5)
        await b.start()
        await asyncio.sleep(1.0)
        assert not b.is_leader
        # simulate a crash: the leader's process dies without deleting its key
        assert a._task is not None
        a._task.cancel()
        await nc1.close()
        t0 = time.monotonic()
        await async_wait_for(lambda: b.is_leader, timeout=8)
        took = time.monotonic() - t0
        assert took < 2.0 + 2.0  # TTL plus campaign slack
        assert b.epoch > a.epoch
    finally:
        await b.stop()
        await nc2.close()


async def test_ttl_bounds_are_checked(nats_server: NatsServer) -> None:
    nc = await _connect(nats_server)
    try:
        with pytest.raises(ElectionError, match="between"):
            Election(nc.jetstream(), identity="x", ttl=0.1)
    finally:
        await nc.close()
