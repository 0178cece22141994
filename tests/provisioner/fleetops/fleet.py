"""A provisioned fleet for the fleet operations tests: real brokers, real nodes, mTLS overlays.

The stack (:mod:`testbed.stack`): the isolated provisioning broker, a local CA, one nats-server
per overlay of the sample registry demanding client certificates of that CA, the reference
helper in-process. The provisioner gets its own client certificate from the CA, named in the
registry as each overlay's ``client:`` (relative paths: they resolve against the registry
file). :class:`RequestLog` watches the overlays' node subjects and counts, per node, every
request that reaches it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from choria_core.natsconn import sync_flush
from choria_core.protocol import decode_payload, decode_request, parse_rpc_request
from node_agent.node import NodeAgent
from provisioner.service import Provisioner
from testbed.stack import (
    BrokerSpec,
    CASpec,
    HelperSpec,
    OverlaySpec,
    ProvisionerSpec,
    Stack,
    StackSpec,
)
from tests.support import async_wait_for

TOKEN = "fleetops-provisioning-token"
PROV_IDENTITY = "prov.fleetops.example.net"

SPEC = StackSpec(
    broker=BrokerSpec(kind="isolated"),
    ca=CASpec(kind="local", common_name="Fleet Operations Test CA"),
    overlays=OverlaySpec(
        registry="sample", per_overlay=True, accounts=False, mutual_tls=True, min_capacity=100
    ),
    helper=HelperSpec(kind="reference", mode="python", timeout=10),
    provisioner=ProvisionerSpec(identity=PROV_IDENTITY, site="test", rpc_timeout=5),
    token=TOKEN,
)


class RequestLog:
    """Every request published to ``mcollective.node.<identity>`` on the overlay brokers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []  # (identity, agent, action)
        self._ncs: list[Any] = []

    async def watch(self, url: str, tls: ssl.SSLContext) -> None:
        nc = await nats.connect(url, tls=tls, name="request-log")

        async def on_msg(msg: Any) -> None:
            req, _ = decode_request(msg.data)
            body = parse_rpc_request(decode_payload(req.message))
            self.requests.append((msg.subject.split(".", 2)[2], req.agent, body.action))

        await nc.subscribe("mcollective.node.>", cb=on_msg)
        await sync_flush(nc)
        self._ncs.append(nc)

    def count(self, action: str) -> Counter[str]:
        return Counter(i for i, _, a in self.requests if a == action)

    async def close(self) -> None:
        for nc in self._ncs:
            await nc.close()


@dataclass
class Fleet:
    stack: Stack
    overlays_path: Path
    log: RequestLog
    nodes: list[NodeAgent] = field(default_factory=list)

    def config(self, **overrides: Any) -> Any:
        return self.stack.provisioner_config(overlays=str(self.overlays_path), **overrides)

    async def provisioner(self, **overrides: Any) -> Provisioner:
        return await self.stack.managed_provisioner(
            self.config(**overrides), discovery_timeout=0.5, rpc_backoff=0.05
        )

    def node(self, identity: str) -> NodeAgent:
        n = NodeAgent(
            identity=identity,
            token_path=self.stack.token_path,
            state_dir=self.stack.workdir / "nodes" / identity,
            facts={"role": "test"},
            key_type="ec",
            restart_delay_scale=0.01,
            durable=False,
            alive_events=False,
        )
        self.nodes.append(n)
        return n

    async def provisioned_nodes(self, prov: Provisioner, count: int) -> list[NodeAgent]:
        """``count`` nodes, started and provisioned into their overlays by ``prov``."""
        nodes = [self.node(f"web-{i:02d}.fleetops.example.net") for i in range(count)]
        await asyncio.gather(*(n.start() for n in nodes))
        await asyncio.gather(*(n.wait_normal(60) for n in nodes))
        await async_wait_for(lambda: all(overlay_of(prov, n) for n in nodes), 10)
        return nodes


def overlay_of(prov: Provisioner, node: NodeAgent) -> str:
    rec = prov.node(node.identity)
    return str(rec.get("overlay") or "") if rec else ""


def client_tls(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
