"""The node against the auth-callout provisioning broker (no user/password, token only, TLS)."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools import create_provisioning_token
from node_agent.node import NodeAgent
from tests.node_agent.client import TOKEN, ProvClient
from tests.support import missing_dependency

pytestmark = pytest.mark.integration


async def test_node_admitted_by_auth_callout_over_tls(tmp_path: Path) -> None:
    try:
        from testbed.isolated_broker import start_isolated_broker
    except ImportError as exc:  # another contributor's module
        missing_dependency("testbed.isolated_broker", f"it failed to import: {exc}")
        raise
    key = ed25519.Ed25519PrivateKey.generate()
    broker = await start_isolated_broker(tmp_path / "broker", [key.public_key()], tls=True)
    async with broker:
        assert broker.url.startswith("tls://") and broker.tls_ca is not None
        token = tmp_path / "provisioning.jwt"
        token.write_text(create_provisioning_token(key, token=TOKEN, urls=[broker.url]))
        node = NodeAgent(
            identity="callout-node.example.net",
            token_path=token,
            state_dir=tmp_path / "state",
            tls_ca=broker.tls_ca,  # verify the broker, which go-choria never does
        )
        user, password = broker.provisioner_credentials
        nc = await nats.connect(broker.url, user=user, password=password, tls=broker.tls_context())
        try:
            await node.start()
            client = await ProvClient.attach(nc, "provisioning")
            assert await client.discover(window=2, expect=1) == [node.identity]
            r = await client.rpc(node.identity, "choria_provision", "jwt", {"token": TOKEN})
            assert r is not None and r.statuscode == 0
            assert r.data["jwt"] == token.read_text()
        finally:
            await node.stop()
            await nc.close()
