"""The provisioner's own NATS client hands its hot subscriptions' messages straight to a
synchronous handler (``_ChoriaClient.route_direct``): RPC replies, lifecycle events and the
inventory's stream acknowledgements. Real nats-server, real provisioner client, real nodes
answering (``Responder``), real JetStream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from choria_core.natsconn import sync_flush
from choria_core.protocol import RPCReply, encode_event, new_event
from provisioner.connection import _ChoriaClient
from provisioner.discovery import Discovery
from provisioner.inventory import (
    Inventory,
    InventoryWriteError,
    IssuedCertificate,
    _AckedWriter,
)
from provisioner.metrics import Metrics
from provisioner.queue import AddResult
from provisioner.rpc import RPCClient, RPCTimeout
from testbed.natsserver import NatsServer
from tests.provisioner.e2e.responder import Responder
from tests.provisioner.test_inventory import _cert_pem
from tests.support import async_wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def choria_nc(shared_nats_server: NatsServer) -> AsyncIterator[Any]:
    user, pw = shared_nats_server.users["provisioner"]
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = _ChoriaClient()
    await nc.connect(shared_nats_server.url, user=user, password=pw, error_cb=on_error)
    nc.seen_errors = errors  # type: ignore[attr-defined]
    yield nc
    await nc.close()


async def _plain(server: NatsServer) -> Any:
    user, pw = server.users["provisioner"]
    return await nats.connect(server.url, user=user, password=pw)


async def test_rpc_replies_are_handled_as_read(
    choria_nc: Any, shared_nats_server: NatsServer
) -> None:
    rpc = RPCClient(choria_nc, identity="prov-direct.example.net", metrics=Metrics(site="t"))
    await rpc.start()
    user, pw = shared_nats_server.users["node"]

    def echo(action: str, data: dict[str, Any]) -> RPCReply:
        return RPCReply(action=action, data={"n": data["n"]})

    node = Responder(shared_nats_server.url, user, pw, "direct.example.net", echo)
    await node.start()
    try:
        assert choria_nc._direct[rpc._sub._id] == rpc._on_direct_reply
        results = await asyncio.gather(
            *(
                rpc.call("direct.example.net", "rpcutil", "ping", {"n": i}, tries=1, timeout=20)
                for i in range(300)
            )
        )
        assert [r["n"] for r in results] == list(range(300))
        # nats-py's own delivery (message objects, the bounded queue, its task) was not used
        assert rpc._sub._received == 0 and rpc._sub._pending_queue.qsize() == 0
        # no responders (nobody subscribed to the node's subject) is still recognised
        with pytest.raises(RPCTimeout):
            await rpc.call("nobody.example.net", "rpcutil", "ping", tries=1, timeout=0.5)
        assert rpc.no_responders == 1
    finally:
        await node.stop()
        await rpc.close()
    assert rpc._sub is None and not choria_nc._direct


async def test_hostile_replies_are_counted_and_the_reader_survives(
    choria_nc: Any, shared_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Junk on the reply prefix is decoded as read (nothing is buffered, so nothing waits to
    be dropped), counted, and logged with the sender-chosen subject escaped; a handler that
    raises is reported to the error callback and the connection goes on reading."""
    rpc = RPCClient(choria_nc, identity="prov-junk.example.net", metrics=Metrics(site="t"))
    await rpc.start()
    flooder = await _plain(shared_nats_server)
    try:
        caplog.set_level(logging.DEBUG, logger="provisioner.rpc")
        for i in range(2000):
            await flooder.publish(f"{rpc._prefix}.{i:032x}", b"x" * 512)
        await flooder.publish(f"{rpc._prefix}.\x1b[31mred", b"{}")
        await flooder.flush()
        await async_wait_for(lambda: rpc.bad_replies == 2001, 10)
        assert rpc.dropped_replies == 0 and rpc._sub._pending_queue.qsize() == 0
        assert "\x1b" not in caplog.text and "\\x1b[31mred" in caplog.text

        def boom(subject: bytes, data: bytes, status: str | None) -> None:
            raise RuntimeError("handler bug")

        choria_nc._direct[rpc._sub._id] = boom
        await flooder.publish(f"{rpc._prefix}.{1:032x}", b"junk")
        await flooder.flush()
        await async_wait_for(lambda: choria_nc.seen_errors, 5)
        assert isinstance(choria_nc.seen_errors[-1], RuntimeError)
        choria_nc._direct[rpc._sub._id] = rpc._on_direct_reply
        await flooder.publish(f"{rpc._prefix}.{2:032x}", b"junk")
        await flooder.flush()
        await async_wait_for(lambda: rpc.bad_replies == 2002, 5)
        assert choria_nc.is_connected
    finally:
        await flooder.close()
        await rpc.close()


class _Collector:
    def __init__(self) -> None:
        self.added: list[str] = []

    def __call__(self, identity: str, source: str) -> AddResult:
        self.added.append(identity)
        return AddResult.ADDED


async def test_lifecycle_events_are_handled_as_read(
    choria_nc: Any, shared_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="provisioner.discovery")
    metrics = Metrics(site="t")
    add = _Collector()
    rpc = RPCClient(choria_nc, identity="prov-events.example.net", metrics=metrics)
    disc = Discovery(choria_nc, rpc, add, metrics, interval=3600, timeout=0.2)
    await disc.activate(sweep=False)
    pub = await _plain(shared_nats_server)
    subject = "choria.lifecycle.event.startup.provision_mode_server"
    try:
        sub = disc._sub
        assert choria_nc._direct[sub._id] == disc._on_direct_event
        for fmt in ("cloudevents", "legacy"):
            ev = new_event("startup", identity=f"{fmt}.example.net", component="x")
            await pub.publish(subject, encode_event(ev, format=fmt))
        await pub.publish(subject, b"not json")
        await pub.flush()
        await async_wait_for(lambda: len(add.added) == 2, 5)
        await async_wait_for(lambda: "ignoring undecodable" in caplog.text, 5)
        assert add.added == ["cloudevents.example.net", "legacy.example.net"]
        assert sub._received == 0 and metrics.discovery_errors.value("t") == 1
        await disc.deactivate()
        assert not choria_nc._direct
    finally:
        await pub.close()


async def test_inventory_writes_wait_for_the_stream(choria_nc: Any) -> None:
    inv = await Inventory.open(choria_nc.jetstream(), "T_ISSUED_DIRECT")
    writer = inv._writer
    assert writer is not None and choria_nc._direct[writer._sub._id] == writer._on_ack
    recs = [
        IssuedCertificate.from_certificate(_cert_pem(f"n{i}"), identity=f"n{i}.example.net")
        for i in range(3)
    ]
    await asyncio.gather(*(inv.record(r) for r in recs * 20))
    assert not writer._waiting
    # durable: another handle, through nats-py's own KV client, reads what was written
    plain = await Inventory.open(choria_nc.jetstream(), "T_ISSUED_DIRECT")
    for rec in recs:
        assert await plain.get(rec.identity) == rec
    assert writer._sub._received == 0


async def test_inventory_write_failures_raise(choria_nc: Any) -> None:
    rec = IssuedCertificate.from_certificate(_cert_pem("n1"), identity="n1.example.net")
    # no stream behind the subject: the server's no-responders status
    missing = await _AckedWriter.open(choria_nc, "T_NO_SUCH_BUCKET")
    assert missing is not None
    with pytest.raises(InventoryWriteError, match="no stream"):
        await missing.put("x509.abc", rec.to_bytes())
    # an acknowledgement that never comes (a listener that does not answer): the timeout
    silent = await choria_nc.subscribe("$KV.T_SILENT.>")
    await sync_flush(choria_nc)
    quiet = await _AckedWriter.open(choria_nc, "T_SILENT")
    assert quiet is not None
    quiet._timeout = 0.3
    with pytest.raises(InventoryWriteError, match="in time"):
        await quiet.put("x509.abc", rec.to_bytes())
    assert not quiet._waiting
    await silent.unsubscribe()

    # a foreign or malformed acknowledgement is not a stored record
    async def answer(msg: Any) -> None:
        await msg.respond(b'{"stream":"KV_OTHER","seq":1}' if b"a1" in msg.data else b"[1]")

    fake = await choria_nc.subscribe("$KV.T_FAKE.>", cb=answer)
    await sync_flush(choria_nc)
    forged = await _AckedWriter.open(choria_nc, "T_FAKE")
    assert forged is not None
    with pytest.raises(InventoryWriteError, match="another stream"):
        await forged.put("k", b"a1")
    with pytest.raises(InventoryWriteError, match="malformed"):
        await forged.put("k", b"b2")
    await fake.unsubscribe()


async def test_without_the_nats_py_hook_everything_takes_the_public_path(
    choria_nc: Any, shared_nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nats-py whose private message hook has another shape turns direct routing off
    (``DIRECT_ROUTING``): nothing is routed, replies arrive through nats-py's own delivery and
    the inventory writes through ``KeyValue.put``."""
    import provisioner.connection as connection

    monkeypatch.setattr(connection, "DIRECT_ROUTING", False)
    rpc = RPCClient(choria_nc, identity="prov-public.example.net", metrics=Metrics(site="t"))
    await rpc.start()
    assert choria_nc._direct == {}
    user, pw = shared_nats_server.users["node"]

    def echo(action: str, data: dict[str, Any]) -> RPCReply:
        return RPCReply(action=action, data={"n": data["n"]})

    node = Responder(shared_nats_server.url, user, pw, "public.example.net", echo)
    await node.start()
    try:
        result = await rpc.call("public.example.net", "rpcutil", "ping", {"n": 7}, tries=1)
        assert result["n"] == 7
        assert rpc._sub._received >= 1  # nats-py's own delivery carried the reply
        js = choria_nc.jetstream()
        await js.create_key_value(bucket="DIRECT_OFF")
        assert await _AckedWriter.open(choria_nc, "DIRECT_OFF") is None
    finally:
        await node.stop()
        await rpc.close()
