"""KVLedger semantics against a real nats-server (JetStream KV in the PROVISIONING account)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from overlays import (
    AlreadyAssigned,
    KVLedger,
    LedgerError,
    OverlayRegistry,
    Placer,
    ReservationLost,
)
from overlays.kvledger import node_key

pytestmark = pytest.mark.integration

_bucket_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def js(shared_nats_server: Any) -> AsyncIterator[Any]:
    user, password = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=password)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def _bucket() -> str:
    return f"OVL_TEST_{next(_bucket_ids)}_{id(object())}"


async def test_reserve_commit_release_roundtrip(js: Any) -> None:
    clock = Clock()
    ledger = await KVLedger.open(js, _bucket(), clock=clock)
    assert await ledger.reserve("a", "n1.example.net", capacity=2, ttl_s=30, group="acme")
    assert await ledger.reserve("a", "n1.example.net", capacity=2, ttl_s=30)  # idempotent
    assert await ledger.counts() == {"a": 1}
    entry = await ledger.entry("n1.example.net")
    assert entry is not None and entry.state == "reserved" and entry.group == "acme"
    assert entry.expires == clock.now + 30

    with pytest.raises(AlreadyAssigned) as exc:
        await ledger.reserve("b", "n1.example.net", capacity=5, ttl_s=30)
    assert exc.value.overlay == "a"

    assert await ledger.reserve("a", "n2.example.net", capacity=2, ttl_s=30)
    assert not await ledger.reserve("a", "n3.example.net", capacity=2, ttl_s=30)  # full
    assert await ledger.counts() == {"a": 2}

    await ledger.commit("a", "n1.example.net")
    assert (await ledger.entry("n1.example.net")).state == "committed"  # type: ignore[union-attr]
    with pytest.raises(ReservationLost):
        await ledger.commit("b", "n2.example.net")

    await ledger.release("a", "n2.example.net")
    await ledger.release("a", "n2.example.net")  # no-op
    assert await ledger.counts() == {"a": 1}
    # A released node can be placed again (kv.create over the tombstone).
    assert await ledger.reserve("a", "n2.example.net", capacity=2, ttl_s=30)
    assert set(await ledger.assignments()) == {"n1.example.net", "n2.example.net"}


async def test_expiry_sweep_and_reclaim(js: Any) -> None:
    clock = Clock()
    bucket = _bucket()
    ledger = await KVLedger.open(js, bucket, clock=clock)
    assert await ledger.reserve("a", "n1", capacity=1, ttl_s=10)
    assert not await ledger.reserve("a", "n2", capacity=1, ttl_s=10)
    clock.now += 11
    assert await ledger.assignment("n1") is None
    with pytest.raises(ReservationLost):
        await ledger.commit("a", "n1")
    assert await ledger.sweep() == 1
    assert await ledger.counts() == {}
    assert await ledger.reserve("a", "n2", capacity=1, ttl_s=10)

    # The node's own next reserve reclaims its expired reservation, even elsewhere.
    clock.now += 11
    assert await ledger.reserve("b", "n2", capacity=1, ttl_s=10)
    assert await ledger.counts() == {"b": 1}

    # A second process (own ledger object, own caches) sees the same state.
    other = KVLedger(js, bucket, clock=clock)
    assert await other.assignment("n2") == "b"
    assert not await other.reserve("b", "n9", capacity=1, ttl_s=10)


async def test_concurrent_reserves_never_overfill(js: Any) -> None:
    """Three ledger objects (as if three processes) race 300 nodes for 100 places."""
    bucket = _bucket()
    ledgers = [await KVLedger.open(js, bucket) for _ in range(3)]
    results = await asyncio.gather(
        *(ledgers[i % 3].reserve("a", f"n{i % 250}", capacity=100, ttl_s=60) for i in range(300)),
        return_exceptions=True,
    )
    assert not [
        r for r in results if isinstance(r, Exception) and not isinstance(r, AlreadyAssigned)
    ]
    assert (await ledgers[0].counts()) == {"a": 100}
    held = await ledgers[1].assignments()
    assert len(held) == 100
    # Every node that was told "yes" holds the place; nobody else does.
    granted = {f"n{i % 250}" for i, r in enumerate(results) if r is True}
    assert granted == set(held)


async def test_groups_cas(js: Any) -> None:
    bucket = _bucket()
    a, b = await KVLedger.open(js, bucket), await KVLedger.open(js, bucket)
    assert await a.group_overlays("acme corp/β") == []
    assert await a.extend_group("acme corp/β", [], "ov1") == ["ov1"]
    # b has not seen the claim: its CAS loses and it learns the winner's list.
    assert await b.extend_group("acme corp/β", [], "ov2") == ["ov1"]
    assert await b.extend_group("acme corp/β", ["ov1"], "ov2") == ["ov1", "ov2"]
    assert await a.group_overlays("acme corp/β") == ["ov1"]  # cached prefix
    assert await a.group_overlays("acme corp/β", fresh=True) == ["ov1", "ov2"]


def test_node_key_escapes_unsafe_identities() -> None:
    assert node_key("node-1.example.net") == "node.node-1.example.net"
    for weird in ("a..b", "a b", "x>", "*.y", ".lead"):
        key = node_key(weird)
        assert key.startswith("node.=") and " " not in key and ">" not in key


async def test_placer_on_kv_ledger_and_outage(nats_server: Any) -> None:
    reg = OverlayRegistry.from_dict(
        {
            "overlays": [
                {"name": "a", "brokers": ["nats://a:4222"], "capacity": 2},
                {"name": "b", "brokers": ["nats://b:4222"], "capacity": 2},
            ],
            "placement": {"affinity": "customer", "ledger_retry_after": 7},
        }
    )
    user, password = nats_server.users["provisioner"]
    nc = await nats.connect(nats_server.url, user=user, password=password, allow_reconnect=False)
    ledger = await KVLedger.open(nc.jetstream(timeout=2), "OVL_PLACER")
    placer = Placer(reg, ledger)
    got = [await placer.place(f"n{i}", {"customer": "acme"}, commit=True) for i in range(3)]
    assert got[0].overlay == got[1].overlay and got[2].overlay != got[0].overlay
    assert "spill-over #1" in got[2].reason
    assert (await placer.place("n0", {"customer": "acme"})).policy == "stable"

    nats_server.stop()
    await asyncio.sleep(0.2)
    p = await placer.place("n9", {"customer": "acme"})
    assert p.deferred and p.retry_after == 7 and "ledger unavailable" in p.reason
    assert password not in p.reason
    with pytest.raises(LedgerError):
        await ledger.counts()
    await nc.close()
