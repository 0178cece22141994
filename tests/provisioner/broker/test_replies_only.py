"""Replies only to requests: a node answers what it was asked, it never publishes replies unasked.

Real nats-server with the auth callout (the e2e environment), the real provisioner and the real
node agent. The hostile node holds a valid token and knows the provisioner's reply prefix (it is
``md5(callerid)``, predictable); it floods forged replies there while a well-behaved node is
provisioned beside it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from choria_core.protocol import reply_prefix
from tests.provisioner.broker.conftest import connect
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

FLOOD = 500


async def test_unsolicited_replies_are_refused_and_a_node_beside_is_provisioned(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    broker = prov_env.broker
    assert broker is not None  # the isolated broker: the callout mints the node's permissions
    prov = prov_env.provisioner()
    await prov.start()
    observer = await connect(**broker.provisioner_connect_options())
    evil = None
    try:
        prefix = reply_prefix("provisioning", prov.rpc.callerid)
        seen: list[bytes] = []

        async def on_reply(msg: Any) -> None:
            if b"forged" in msg.data:
                seen.append(msg.data)

        await observer.nc.subscribe("provisioning.reply.>", cb=on_reply)
        await observer.nc.flush()

        evil = await connect(
            **broker.node_connect_options("evil.example.net", prov_env.token_path.read_text())
        )
        good = prov_env.node("good.example.net")
        await good.start()
        for i in range(FLOOD):
            # a well-formed request id: the subject is exactly where a real reply would land
            await evil.nc.publish(f"{prefix}.{i:032x}", b'{"forged": true}')
            if i % 50 == 0:
                await asyncio.sleep(0)
        await evil.nc.publish("provisioning.reply.anything.at.all", b"forged")
        await evil.nc.flush()
        await async_wait_for(
            lambda: any("permissions violation for publish" in e.lower() for e in evil.errors), 5
        )

        await good.wait_normal(30)  # its replies went out as responses to the requests it got
        prov_env.verify_node_certificate(good)
        rec = prov.node("good.example.net")
        assert rec is not None and rec["state"] == "provisioned"
        await observer.nc.flush()
        assert seen == []  # not one forged reply was delivered, to anybody
        assert prov.rpc.bad_replies == 0 and prov.rpc.late_replies == 0
        assert any(prefix in e for e in evil.errors)
    finally:
        if evil is not None:
            await evil.close()
        await observer.close()
        await prov.stop()
