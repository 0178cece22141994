"""The placer works out a node signature's tiers once per registry, with the same answers.

A node's tiers depend on its facts only through the pin rule they match, its region fact and
its affinity group's overlays; ``Placer._plan`` remembers them per signature and registry. These
tests compare against a placer whose memory is emptied before every node (the chain run in full),
on real registries and the in-memory ledger.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from overlays import MemoryLedger, Overlay, OverlayRegistry, PlacementConfig, Placer
from overlays import placer as placer_module
from overlays.model import PinRule
from overlays.policy import _hrw_unit, hrw_unit


def _ov(name: str, capacity: int, region: str = "", **kw: Any) -> Overlay:
    return Overlay(
        name=name,
        brokers=[f"nats://{name}.example.net:4222"],
        capacity=capacity,
        region=region,
        **kw,
    )


def _registry(*, cordon: str | None = None) -> OverlayRegistry:
    overlays = [
        _ov("eu-1", 40, "eu"),
        _ov("eu-2", 40, "eu", state="cordoned" if cordon == "eu-2" else "active"),
        _ov("us-1", 60, "us", weight=1.5),
        _ov("ap-1", 10, "ap"),
    ]
    return OverlayRegistry(
        overlays,
        PlacementConfig(
            affinity="customer",
            policies=["stable", "pinned", "affinity", "region", "least_filled"],
            region_fact="region",
            pins=[
                PinRule(match={"customer": "bank"}, overlays=["ap-1"], strict=True),
                PinRule(match={"role": "edge*"}, overlays=["us-1", "eu-1"], strict=False),
            ],
        ),
    )


def _node(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    facts: dict[str, Any] = {"region": rng.choice(["eu", "us", "ap", "mars"])}
    customer = rng.choice(["c1", "c2", "c3", "bank", None])
    if customer is not None:
        facts["customer"] = customer
    if rng.random() < 0.3:
        facts["role"] = rng.choice(["edge-a", "core"])
    return f"node-{i}.example.net", facts


async def _placements(
    placer: Placer, nodes: list[tuple[str, dict[str, Any]]], *, fresh: bool
) -> list[tuple[str | None, str, str, bool, str | None]]:
    out = []
    for identity, facts in nodes:
        if fresh:
            placer._plans.clear()
        p = await placer.place(identity, facts)
        out.append((p.overlay, p.reason, p.policy, p.deferred, p.group))
        if p.overlay is not None:
            await placer.commit(identity)
    return out


async def test_remembered_tiers_give_the_same_placements_as_the_full_chain() -> None:
    rng = random.Random(18)
    nodes = [_node(rng, i) for i in range(150)]
    remembered = Placer(_registry(), MemoryLedger())
    full = Placer(_registry(), MemoryLedger())
    assert await _placements(remembered, nodes, fresh=False) == await _placements(
        full, nodes, fresh=True
    )
    assert remembered._plans  # the tiers were remembered...
    assert len(remembered._plans) < len(nodes)  # ...once per signature, not once per node


async def test_a_new_registry_is_planned_afresh() -> None:
    placer = Placer(_registry(), MemoryLedger())
    facts = {"region": "eu", "customer": "c9"}
    first = await placer.place("n1.example.net", facts)
    assert first.overlay in ("eu-1", "eu-2")
    # the same signature on a registry where eu-1 takes no new nodes: not the old tiers
    placer.registry = _registry(cordon="eu-2")
    placer.registry = OverlayRegistry(
        [
            o.model_copy(update={"state": "cordoned"}) if o.name == "eu-1" else o
            for o in placer.registry
        ],
        placer.registry.placement,
    )
    second = await placer.place("n2.example.net", {"region": "eu", "customer": "c8"})
    assert second.overlay not in ("eu-1", "eu-2")


async def test_defers_and_long_region_facts_are_not_remembered() -> None:
    registry = OverlayRegistry(
        [_ov("ap-1", 0, "ap"), _ov("eu-1", 5, "eu")],
        PlacementConfig(
            policies=["stable", "pinned", "region", "least_filled"],
            region_fact="region",
            pins=[PinRule(match={"customer": "bank"}, overlays=["ap-1"], strict=True)],
        ),
    )
    placer = Placer(registry, MemoryLedger())
    deferred = await placer.place("n1.example.net", {"customer": "bank"})
    assert deferred.deferred and "n1.example.net" == deferred.identity
    assert placer._plans == {}
    long_region = "r" * 300
    placed = await placer.place("n2.example.net", {"region": long_region})
    assert placed.overlay == "eu-1"
    assert placer._plans == {}
    await placer.place("n3.example.net", {"region": "eu"})
    assert list(placer._plans) == [(-1, (), "eu")]


async def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placer_module, "PLAN_CACHE", 3)
    placer = Placer(_registry(), MemoryLedger())
    for i in range(10):
        await placer.place(f"n{i}.example.net", {"region": f"r{i}"})
        assert len(placer._plans) <= 3


def test_remembered_rendezvous_hashes_are_the_hashes() -> None:
    for key in ("cust-1", "node-1.example.net", "x" * 256, "y" * 257):
        for overlay in ("eu-1", "us-1"):
            assert hrw_unit(key, overlay) == _hrw_unit(key, overlay)
    assert 0.0 < hrw_unit("cust-1", "eu-1") < 1.0
