"""Discovery: startup events in both formats, filtering, queue group, pause unsubscribes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from choria_core.natsconn import sync_flush
from choria_core.protocol import encode_event, new_event
from provisioner.discovery import Discovery
from provisioner.metrics import Metrics
from provisioner.queue import AddResult
from provisioner.rpc import RPCClient
from testbed.natsserver import NatsServer
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

SUBJECT = "choria.lifecycle.event.startup.provision_mode_server"


class Collector:
    def __init__(self) -> None:
        self.added: list[tuple[str, str]] = []

    def __call__(self, identity: str, source: str) -> AddResult:
        self.added.append((identity, source))
        return AddResult.ADDED


@pytest.fixture
async def conns(shared_nats_server: NatsServer) -> AsyncIterator[tuple[Any, Any]]:
    user, pw = shared_nats_server.users["provisioner"]
    a = await nats.connect(shared_nats_server.url, user=user, password=pw)
    b = await nats.connect(shared_nats_server.url, user=user, password=pw)
    yield a, b
    await a.close()
    await b.close()


def _discovery(nc: Any, add: Collector, metrics: Metrics) -> Discovery:
    rpc = RPCClient(nc, identity="disc-test.example.net", metrics=metrics)
    return Discovery(nc, rpc, add, metrics, interval=3600, timeout=0.3)


async def test_events_in_both_formats(conns: tuple[Any, Any]) -> None:
    nc, pub = conns
    metrics = Metrics(site="d")
    add = Collector()
    disc = _discovery(nc, add, metrics)
    await disc.start()
    try:
        for fmt, ident in (("cloudevents", "ce.example.net"), ("legacy", "legacy.example.net")):
            ev = new_event("startup", identity=ident, component="provision_mode_server")
            await pub.publish(SUBJECT, encode_event(ev, format=fmt))  # type: ignore[arg-type]
        # ignored: another event type, a bad identity, garbage
        other = new_event("shutdown", identity="x.example.net", component="provision_mode_server")
        await pub.publish(SUBJECT, encode_event(other))
        bad = new_event("startup", identity="bad identity>", component="provision_mode_server")
        await pub.publish(SUBJECT, encode_event(bad))
        await pub.publish(SUBJECT, b"not an event")
        await pub.flush()
        await async_wait_for(lambda: len(add.added) >= 2, 5)
        await asyncio.sleep(0.2)
        assert add.added == [("ce.example.net", "event"), ("legacy.example.net", "event")]
        assert metrics.event_discovered.value("d") == 2
        assert metrics.discovery_errors.value("d") == 2
    finally:
        await disc.stop()


async def test_replicas_share_events_and_paused_ones_do_not_listen(conns: tuple[Any, Any]) -> None:
    nc_a, nc_b = conns
    add_a, add_b = Collector(), Collector()
    disc_a = _discovery(nc_a, add_a, Metrics(site="a"))
    disc_b = _discovery(nc_b, add_b, Metrics(site="b"))
    await disc_a.start()
    await disc_b.start()
    try:
        for i in range(40):
            ev = new_event(
                "startup", identity=f"q{i}.example.net", component="provision_mode_server"
            )
            await nc_a.publish(SUBJECT, encode_event(ev))
        await async_wait_for(lambda: len(add_a.added) + len(add_b.added) >= 40, 5)
        await asyncio.sleep(0.2)
        # a queue group: every event reaches exactly one replica
        assert len(add_a.added) + len(add_b.added) == 40
        assert not {i for i, _ in add_a.added} & {i for i, _ in add_b.added}
        await disc_b.deactivate()  # paused standby
        add_a.added.clear()
        add_b.added.clear()
        for i in range(10):
            ev = new_event(
                "startup", identity=f"p{i}.example.net", component="provision_mode_server"
            )
            await nc_a.publish(SUBJECT, encode_event(ev))
        await async_wait_for(lambda: len(add_a.added) >= 10, 5)
        assert add_b.added == []
    finally:
        await disc_a.stop()
        await disc_b.stop()


async def test_concurrent_discover_now_calls_share_a_fresh_sweep(conns: tuple[Any, Any]) -> None:
    nc, _ = conns
    metrics = Metrics(site="s")
    disc = _discovery(nc, Collector(), metrics)
    results = await asyncio.gather(*(disc.discover_now() for _ in range(5)))
    assert results == [0] * 5
    # the first call runs one sweep; the four callers that queued behind it share the next
    assert metrics.discover_cycles.value("s") == 2


async def test_long_identities_are_refused_counted_and_logged_bounded(
    conns: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    nc, pub = conns
    metrics = Metrics(site="d")
    add = Collector()
    disc = _discovery(nc, add, metrics)
    await disc.start()
    caplog.set_level("WARNING", logger="provisioner.discovery")
    try:
        long_id = ".".join("a" * 63 for _ in range(72))
        label = "b" * 64 + ".example.net"
        for ident in (long_id, label, long_id, "ok.example.net"):
            ev = new_event("startup", identity=ident, component="provision_mode_server")
            await pub.publish(SUBJECT, encode_event(ev))
        await pub.flush()
        await async_wait_for(lambda: len(add.added) >= 1, 5)
        await asyncio.sleep(0.2)
        assert add.added == [("ok.example.net", "event")]
        sample = metrics.registry.get_sample_value
        refused = "choria_provisioner_identity_refused_total"
        assert sample(refused, {"site": "d", "source": "event", "reason": "too_long"}) == 2
        assert sample(refused, {"site": "d", "source": "event", "reason": "label_too_long"}) == 1
        lines = [m for m in caplog.messages if "refused node identity" in m]
        # rate limited (one line per interval) and bounded (80 escaped characters of identity)
        assert len(lines) == 1 and len(lines[0]) < 250 and "too_long, 4607 characters" in lines[0]
    finally:
        await disc.stop()


async def _chatty_fleet(nc: Any, count: int, gap: float) -> Any:
    """A responder that answers one discovery ping as ``count`` nodes, one every ``gap`` s."""
    from choria_core.protocol import broadcast_subject, decode_request, encode_reply, new_reply
    from provisioner.rpc import COLLECTIVE

    async def answer(msg: Any) -> None:
        req, headers = decode_request(msg.data)
        for i in range(count):
            sender = f"n{i}.example.net"
            reply = new_reply(req, senderid=sender, message="pong")
            await nc.publish(headers.reply_to or msg.reply, encode_reply(reply, mc_sender=sender))
            await nc.flush()
            await asyncio.sleep(gap)

    tasks: set[asyncio.Task[None]] = set()

    async def on_ping(msg: Any) -> None:  # answer in the background: nats-py runs callbacks in turn
        task = asyncio.create_task(answer(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    sub = await nc.subscribe(broadcast_subject(COLLECTIVE, "discovery"), cb=on_ping)
    await sync_flush(nc)
    return sub


async def test_truncated_sweep_counts_waiting_nodes_as_seen(conns: tuple[Any, Any]) -> None:
    nc, pub = conns
    metrics = Metrics(site="t")
    refreshed: list[int] = []
    rpc = RPCClient(nc, identity="disc-test.example.net", metrics=metrics)
    await rpc.start()

    def on_truncated() -> int:
        refreshed.append(1)
        return 7

    # window > timeout: once answers arrive, only the timeout ends the sweep (no load flakes)
    disc = Discovery(nc, rpc, Collector(), metrics, interval=3600, timeout=0.5, window=1.0,
                     on_truncated=on_truncated)  # fmt: skip
    sub = await _chatty_fleet(pub, count=40, gap=0.05)  # answers for 2 s
    try:
        answered = await disc.discover_now()
        assert 0 < answered < 40  # cut off by the 0.5 s timeout
        assert refreshed == [1] and disc.truncated_sweeps == 1
        await asyncio.sleep(2.2)  # let the first burst finish
        await sub.unsubscribe()
        sub = await _chatty_fleet(pub, count=3, gap=0.01)  # answers, then falls quiet
        disc.timeout, disc.window = 5.0, 0.3
        assert await disc.discover_now() == 3
        assert refreshed == [1] and disc.truncated_sweeps == 1  # a complete sweep: no refresh
    finally:
        await sub.unsubscribe()


async def test_periodic_sweep_deferred_while_a_large_backlog_waits(conns: tuple[Any, Any]) -> None:
    """After a truncated sweep, a periodic sweep is deferred while at least as many nodes wait
    as that sweep could read (no fleet-wide ping only to be cut off again); the waiting nodes
    count as seen instead, at most MAX_DEFERRED times in a row, and a small backlog sweeps."""
    from provisioner.discovery import MAX_DEFERRED

    nc, pub = conns
    metrics = Metrics(site="t")
    refreshed: list[int] = []
    waiting = [1000]
    rpc = RPCClient(nc, identity="disc-test.example.net", metrics=metrics)
    await rpc.start()

    def on_truncated() -> int:
        refreshed.append(1)
        return 7

    disc = Discovery(nc, rpc, Collector(), metrics, interval=0.05, timeout=0.5, window=1.0,
                     on_truncated=on_truncated,
                     backlog=lambda: waiting[0])  # fmt: skip
    sub = await _chatty_fleet(pub, count=40, gap=0.05)  # answers for 2 s: truncated
    try:
        assert 0 < await disc.discover_now() < 40
        assert disc.truncated_sweeps == 1 and refreshed == [1]
        started = disc._sweeps_started
        disc._active = True
        loop_task = asyncio.create_task(disc._sweep_loop())
        try:
            # MAX_DEFERRED deferrals, then one sweep runs whatever the backlog
            await async_wait_for(lambda: disc._sweeps_started > started, timeout=10)
            assert disc.deferred_sweeps == MAX_DEFERRED
            assert len(refreshed) >= 1 + MAX_DEFERRED  # each deferral refreshed the waiting
            await async_wait_for(lambda: disc.truncated_sweeps >= 2, timeout=10)
            waiting[0] = 0  # the backlog drained: the next sweeps are not deferred
            deferred = disc.deferred_sweeps
            await async_wait_for(lambda: disc._sweeps_started > started + 2, timeout=15)
            assert disc.deferred_sweeps == deferred
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
    finally:
        await sub.unsubscribe()
