"""RPC client over a real nats-server: request-id matching, retries, wrong senders, discovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest

from choria_core.protocol import RPCReply, decode_request
from provisioner.metrics import Metrics
from provisioner.rpc import RPCClient, RPCStatusError, RPCTimeout
from testbed.natsserver import NatsServer
from tests.provisioner.e2e.responder import Responder
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(shared_nats_server: NatsServer) -> AsyncIterator[RPCClient]:
    user, pw = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=pw)
    rpc = RPCClient(
        nc,
        identity="prov-rpc-test.example.net",
        metrics=Metrics(site="t"),
        timeout=1.0,
        backoff_base=0.01,
    )
    await rpc.start()
    yield rpc
    await rpc.close()
    await nc.close()


async def _responder(server: NatsServer, identity: str, handler: Any, **kw: Any) -> Responder:
    user, pw = server.users["node"]
    r = Responder(server.url, user, pw, identity, handler, **kw)
    await r.start()
    return r


async def test_thousand_requests_in_flight_one_subscription(
    client: RPCClient, shared_nats_server: NatsServer
) -> None:
    async def slow_echo(action: str, data: dict[str, Any]) -> RPCReply:
        await asyncio.sleep(0.2)  # all requests overlap
        return RPCReply(action=action, data={"n": data["n"]})

    nodes = [
        await _responder(shared_nats_server, f"echo{i}.example.net", slow_echo) for i in range(4)
    ]
    subs_before = len(client.nc._subs)
    try:
        results = await asyncio.gather(
            *(
                # 1,000 overlapping 0.2 s requests: the point is one subscription for all of
                # them, not speed, so a loaded machine gets a generous timeout.
                client.call(
                    f"echo{i % 4}.example.net", "rpcutil", "ping", {"n": i}, tries=1, timeout=20
                )
                for i in range(1000)
            )
        )
    finally:
        for n in nodes:
            await n.stop()
    assert [r["n"] for r in results] == list(range(1000))
    assert len(client.nc._subs) == subs_before  # no per-request subscriptions
    assert client.in_flight == 0


async def test_status_error_carries_statusmsg(
    client: RPCClient, shared_nats_server: NatsServer
) -> None:
    def refuse(action: str, data: dict[str, Any]) -> RPCReply:
        return RPCReply(action=action, statuscode=1, statusmsg="Incorrect provision token supplied")

    node = await _responder(shared_nats_server, "refuse.example.net", refuse)
    try:
        with pytest.raises(RPCStatusError) as err:
            await client.call("refuse.example.net", "choria_provision", "jwt", {"token": "x"})
    finally:
        await node.stop()
    assert err.value.statuscode == 1
    assert "Incorrect provision token" in err.value.statusmsg
    assert len(node.requests) == 3  # retried up to the action's tries, as the anchor does
    assert client.metrics is not None
    assert client.metrics.rpc_errors.value("t", "choria_provision#jwt") == 3


async def test_timeout_retries_per_action(
    client: RPCClient, shared_nats_server: NatsServer
) -> None:
    node = await _responder(shared_nats_server, "silent.example.net", lambda a, d: None)
    try:
        with pytest.raises(RPCTimeout) as err:
            await client.call("silent.example.net", "choria_provision", "jwt", timeout=0.2)
    finally:
        await node.stop()
    assert len(node.requests) == 3  # the anchor's tries for jwt
    assert "after 3 tries" in str(err.value)
    assert err.value.reason == "timeout"


async def test_wrong_sender_is_discarded_and_counted(
    client: RPCClient, shared_nats_server: NatsServer
) -> None:
    rogue = await _responder(
        shared_nats_server,
        "victim.example.net",
        lambda a, d: RPCReply(action=a, data={"jwt": "forged", "ecdh_public": "00" * 32}),
        claim_sender="rogue.example.net",
    )
    try:
        with pytest.raises(RPCTimeout) as err:
            await client.call("victim.example.net", "choria_provision", "jwt", tries=1, timeout=0.3)
    finally:
        await rogue.stop()
    assert err.value.reason == "wrong_sender"
    assert "other senders were discarded" in str(err.value)
    assert client.wrong_sender == 1
    assert client.metrics is not None
    assert (
        client.metrics.registry.get_sample_value(
            "choria_provisioner_rpc_wrong_sender_total", {"site": "t"}
        )
        == 1
    )


async def test_broadcast_discovery_sliding_window(
    client: RPCClient, shared_nats_server: NatsServer
) -> None:
    nodes = [
        await _responder(shared_nats_server, f"disc{i}.example.net", lambda a, d: None)
        for i in range(5)
    ]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        found = await client.discover(timeout=5.0, window=0.3)
        elapsed = loop.time() - started
    finally:
        for n in nodes:
            await n.stop()
    assert {f"disc{i}.example.net" for i in range(5)} <= set(found)
    # Stopped ~300 ms after the last reply, not at the 5 s timeout (generous bound).
    assert elapsed < 3.0


async def test_nats_reply_subject_is_the_choria_reply_to(
    client: RPCClient, shared_nats_server: NatsServer
) -> None:
    """The node's answer is a NATS response: the broker can allow replies only as responses."""
    user, pw = shared_nats_server.users["provisioner"]
    node = await nats.connect(shared_nats_server.url, user=user, password=pw)
    got: list[tuple[str, str]] = []

    async def on_request(msg: Any) -> None:
        _, headers = decode_request(msg.data)
        got.append((msg.reply, headers.reply_to or ""))

    try:
        await node.subscribe("provisioning.node.replyto.example.net", cb=on_request)
        await node.subscribe("provisioning.broadcast.agent.discovery", cb=on_request)
        await node.flush()
        with pytest.raises(RPCTimeout):
            await client.call("replyto.example.net", "rpcutil", "ping", tries=1, timeout=0.3)
        await client.discover(timeout=0.3)
    finally:
        await node.close()
    assert len(got) == 2
    for nats_reply, choria_reply_to in got:
        assert nats_reply == choria_reply_to
        assert nats_reply.startswith(client._prefix + ".")


async def test_reply_flood_is_dropped_and_counted_not_buffered(
    shared_nats_server: NatsServer,
) -> None:
    """A flood on the reply prefix overflows a bounded buffer: drops are counted (metric, one
    summary log line), the connection's error callback is not flooded, and the next request
    is still answered."""
    user, pw = shared_nats_server.users["provisioner"]
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(shared_nats_server.url, user=user, password=pw, error_cb=on_error)
    flooder = await nats.connect(shared_nats_server.url, user=user, password=pw)
    metrics = Metrics(site="t")
    rpc = RPCClient(
        nc,
        identity="prov-flood.example.net",
        metrics=metrics,
        timeout=2.0,
        pending_msgs_limit=32,
        pending_bytes_limit=256 * 1024,
    )
    await rpc.start()
    node = await _responder(
        shared_nats_server, "beside.example.net", lambda a, d: RPCReply(action=a, data={"ok": 1})
    )
    try:
        assert rpc._sub._pending_queue.maxsize == 32
        junk = b"x" * 1024
        for i in range(5000):
            await flooder.publish(f"{rpc._prefix}.{i:032x}", junk)
        await flooder.flush()
        await async_wait_for(lambda: rpc.dropped_replies > 0, 5)
        await asyncio.sleep(0.2)
        assert rpc.dropped_replies < 5000
        assert (
            metrics.registry.get_sample_value(
                "choria_provisioner_rpc_replies_dropped_total", {"site": "t"}
            )
            == rpc.dropped_replies
        )
        assert not any(isinstance(e, nats.errors.SlowConsumerError) for e in errors)
        # the well-behaved node beside the flood is still answered
        assert await rpc.call("beside.example.net", "rpcutil", "ping", tries=1) == {"ok": 1}
    finally:
        await node.stop()
        await rpc.close()
        await flooder.close()
        await nc.close()


def test_reply_buffer_must_be_bounded() -> None:
    with pytest.raises(ValueError, match="bounded"):
        RPCClient(object(), identity="x.example.net", pending_msgs_limit=0)
    with pytest.raises(ValueError, match="bounded"):
        RPCClient(object(), identity="x.example.net", pending_bytes_limit=-1)
