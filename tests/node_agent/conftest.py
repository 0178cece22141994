"""Fixtures for the node agent tests: a provisioning-mode node on a real nats-server."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.node import NodeAgent
from testbed.natsserver import NatsServer
from tests.node_agent.client import EventLog, ProvClient, write_token

_ids = itertools.count(1)


@dataclass
class NodeEnv:
    server: NatsServer
    node: NodeAgent
    client: ProvClient
    events: EventLog
    token_path: Path
    state_dir: Path

    @property
    def identity(self) -> str:
        return self.node.identity


@pytest.fixture
async def node_env(shared_nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[NodeEnv]:
    """A started provisioning-mode node (EC keys, scaled-down restart delays) and a client."""
    token = write_token(tmp_path / "provisioning.jwt", shared_nats_server)
    identity = f"n{next(_ids)}-{tmp_path.name[-12:].lower().replace('_', '-')}.example.net"
    client = await ProvClient.connect(shared_nats_server)
    events = await EventLog.watch(client.nc, "choria.lifecycle.event.*.*")
    node = NodeAgent(
        identity=identity,
        token_path=token,
        state_dir=tmp_path / "state",
        facts={"region": "eu-west", "cpu_count": 4},
        key_type="ec",
        restart_delay_scale=0.01,
        durable=False,
    )
    await node.start()
    try:
        yield NodeEnv(shared_nats_server, node, client, events, token, tmp_path / "state")
    finally:
        await node.stop()
        await client.close()
