"""Shared connections (the fleet simulator's ``--connections shared``): a broadcast handed to
tens of thousands of members must not hold back the directed requests of other nodes."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from node_agent.transport import FANOUT_SLICE, ConnectOptions, SharedConnections
from testbed.natsserver import NatsServer

pytestmark = pytest.mark.integration

MEMBERS = 4 * FANOUT_SLICE


async def test_directed_request_gets_through_during_a_large_broadcast(
    nats_server: NatsServer,
) -> None:
    user, password = nats_server.users["provisioner"]
    opts = ConnectOptions(urls=[nats_server.url], name="fanout", user=user, password=password)
    pool = SharedConnections()
    order: list[tuple[str, str]] = []

    def handler_for(identity: str):  # type: ignore[no-untyped-def]
        async def handle(subject: str, data: bytes) -> None:
            if ".broadcast." in subject:
                time.sleep(0.0002)  # the work of one discovery reply, without yielding
            order.append((identity, subject))

        return handle

    for i in range(MEMBERS):
        ident = f"node-{i:05d}.example.net"
        await pool.attach(opts, ident, ["provisioning"], ["discovery"], handler_for(ident))
    client = await nats.connect(nats_server.url, user=user, password=password)
    try:
        await client.publish("provisioning.broadcast.agent.discovery", b"ping")
        await client.publish("provisioning.node.node-00007.example.net", b"direct")
        await client.flush()
        deadline = time.monotonic() + 20
        while len(order) < MEMBERS + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await client.close()
        await pool.close()
    assert len(order) == MEMBERS + 1
    assert sum(".broadcast." in s for _, s in order) == MEMBERS  # every member answered
    directed_at = next(n for n, (_, s) in enumerate(order) if s.endswith(".node-00007.example.net"))
    # handled within the first slices of the broadcast, not after all of it
    assert directed_at <= 2 * FANOUT_SLICE, directed_at
