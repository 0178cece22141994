"""The ``fleet`` fixture: a provisioned fleet (see :mod:`tests.provisioner.fleetops.fleet`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from node_agent.node import NodeAgent
from testbed.natsserver import INSTALL_HINT, NatsServerNotFound, find_nats_server
from testbed.overlay_brokers import client_certificate
from testbed.stack import Stack
from tests.provisioner.fleetops.fleet import PROV_IDENTITY, SPEC, Fleet, RequestLog, client_tls
from tests.support import missing_dependency


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    try:
        find_nats_server()
    except NatsServerNotFound:
        missing_dependency("nats-server", INSTALL_HINT)
    stack = Stack(SPEC, tmp_path)
    log = RequestLog()
    nodes: list[NodeAgent] = []
    try:
        await stack.start()
        stack.write_token(stack.token_path)
        assert stack.ca is not None and stack.ca_cert_path is not None
        assert stack.overlays_path is not None
        cert, key = client_certificate(stack.ca, PROV_IDENTITY, stack.workdir / "client")
        doc = yaml.safe_load(stack.overlays_path.read_text())
        for ov in doc["overlays"]:
            # relative to the registry file (workdir)
            ov["client"] = {
                "certificate": "client/client.pem",
                "key": "client/client-key.pem",
                "ca": str(stack.ca_cert_path),
            }
        stack.overlays_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        tls = client_tls(stack.ca_cert_path, cert, key)
        for ob in stack.overlay_brokers.values():
            await log.watch(ob.url, tls)
        fleet = Fleet(stack, stack.overlays_path, log, nodes)
        yield fleet
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
        await log.close()
        await stack.close()
