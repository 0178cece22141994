"""Placement for the exec fast path: the overlays chain against an empty, per-process ledger.

In exec mode with the in-memory ledger every process starts with an empty ledger, so the
chain of :class:`overlays.Placer` reduces to: plan the tiers (pins, region), rank each tier,
take the first candidate (an empty ledger always has room in an overlay that accepts new
nodes). This module computes exactly that from the registry's plain data (see
:func:`registry_data`), without importing pydantic or the overlays models: importing them
costs more CPU than the rest of an exec.

It must give the same `Placement` fields the reference helper uses (overlay, reason, policy,
retry_after, ca_profile) as the real placer; `tests/helpers/test_reference_fast.py` compares
both over many nodes and registries. Anything unexpected raises :class:`Unsupported`, and the
caller runs the full path instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from choria_core.errors import FleetError
from overlays.policy import fact_value, hrw_unit, match_facts, weighted_unit


class Unsupported(FleetError, reason="fast_path_unsupported"):
    """The fast path cannot decide this case; the full path must run."""


class FastPlacement(NamedTuple):
    """The placement fields the reference helper reads.

    A NamedTuple, not a dataclass: `dataclasses` (with `inspect`) costs an exec process more
    CPU than the whole placement, for requests that sign nothing."""

    overlay: str | None
    reason: str
    policy: str
    deferred: bool = False
    retry_after: float | None = None
    ca_profile: str | None = None


def registry_data(registry: Any) -> dict[str, Any]:
    """Plain data of an :class:`overlays.OverlayRegistry` (for the pre-parsed config cache)."""
    cfg = registry.placement
    return {
        "overlays": [
            {
                "name": o.name,
                "region": o.region,
                "brokers": list(o.brokers),
                "capacity": int(o.capacity),
                "weight": float(o.weight),
                "accepts_new": bool(o.accepts_new),
                "ca_profile": o.ca_profile,
            }
            for o in registry
        ],
        "placement": {
            "affinity": cfg.affinity,
            "policies": list(cfg.policies),
            "region_fact": cfg.region_fact,
            "region_mode": cfg.region_mode,
            "retry_after": float(cfg.retry_after),
            "pins": [
                {
                    "label": rule.label(i),
                    "match": {
                        k: v if isinstance(v, str) else list(v) for k, v in rule.match.items()
                    },
                    "overlays": list(rule.overlays),
                    "strict": bool(rule.strict),
                }
                for i, rule in enumerate(cfg.pins)
            ],
        },
    }


def _rank(ranker: str, tier: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    # The ledger is empty: every fill level is 0.
    if ranker == "least_filled":
        return sorted(
            tier,
            key=lambda o: (
                (0.0 / o["weight"] if o["weight"] else math.inf)
                if o["capacity"]
                else (math.inf / o["weight"] if o["weight"] else math.inf),
                -hrw_unit(key, o["name"]),
            ),
        )
    if ranker == "weighted":

        def score(o: dict[str, Any]) -> float:
            return weighted_unit(key, o["name"], o["weight"])

        return sorted(tier, key=lambda o: -score(o))
    if ranker == "hash":
        return sorted(tier, key=lambda o: -hrw_unit(key, o["name"]))
    raise Unsupported(f"ranker {ranker!r}")


def _split(tiers: list[list[dict[str, Any]]], first: list[dict[str, Any]], *, each: bool) -> Any:
    names = [o["name"] for o in first]
    out: list[list[dict[str, Any]]] = []
    for tier in tiers:
        in_tier = {o["name"]: o for o in tier}
        head = [in_tier[n] for n in names if n in in_tier]
        tail = [o for o in tier if o["name"] not in names]
        out.extend([[o] for o in head] if each else ([head] if head else []))
        if tail:
            out.append(tail)
    return out


def _defer(reason: str, retry_after: float) -> FastPlacement:
    return FastPlacement(None, reason, "defer", deferred=True, retry_after=retry_after)


def _plan(reg: Mapping[str, Any], facts: Mapping[str, Any]) -> tuple[Any, str] | FastPlacement:
    cfg = reg["placement"]
    by_name = {o["name"]: o for o in reg["overlays"]}
    eligible = [o for o in reg["overlays"] if o["accepts_new"]]
    if not eligible:
        return _defer(
            "no overlay accepts new nodes (all are cordoned, draining, or have weight/capacity 0)",
            cfg["retry_after"],
        )
    tiers: list[list[dict[str, Any]]] = [eligible]
    pin_label = ""
    for policy in cfg["policies"][:-1]:
        if policy == "pinned" and cfg["pins"]:
            rule = next((r for r in cfg["pins"] if match_facts(r["match"], facts)), None)
            if rule is None:
                continue
            pin_label = rule["label"]
            open_pinned = [by_name[n] for n in rule["overlays"] if by_name[n]["accepts_new"]]
            if rule["strict"]:
                if not open_pinned:
                    raise Unsupported("strict pin without room")  # the full path words it
                tiers = [[o] for o in open_pinned]
            else:
                tiers = _split(tiers, open_pinned, each=True)
        elif policy == "region" and cfg["region_fact"]:
            region = fact_value(facts, cfg["region_fact"])
            if region is None:
                continue
            if cfg["region_mode"] == "require":
                tiers = [t for t in ([o for o in t if o["region"] == region] for t in tiers) if t]
                if not tiers:
                    return _defer(
                        f"region {region!r} is required and no overlay there accepts new nodes",
                        cfg["retry_after"],
                    )
            else:
                tiers = _split(
                    tiers, [o for t in tiers for o in t if o["region"] == region], each=False
                )
        # "stable" and "affinity" change nothing against an empty ledger.
    return tiers, pin_label


def place(reg: Mapping[str, Any], identity: str, facts: Mapping[str, Any]) -> FastPlacement:
    """The placement an empty :class:`overlays.MemoryLedger` gives ``identity``."""
    if not identity or not isinstance(identity, str):
        raise Unsupported("identity")
    cfg = reg["placement"]
    policies = cfg["policies"]
    affinity = cfg["affinity"]
    group = fact_value(facts, affinity) if affinity and "affinity" in policies else None
    planned = _plan(reg, facts)
    if isinstance(planned, FastPlacement):
        return planned
    tiers, pin_label = planned
    key = group if group is not None else identity
    ranker = policies[-1]
    candidates = [o for t in tiers for o in _rank(ranker, t, key)]
    if not candidates:
        raise Unsupported("no candidates")
    ov = candidates[0]
    parts: list[str] = []
    policy = ranker
    if pin_label:
        parts.append(f"pin {pin_label}")
        policy = "pinned"
    if group is not None:
        parts.append(f"affinity {affinity}={group}: group home")
        policy = "pinned" if pin_label else "affinity"
    parts.append(f"{ranker} chose {ov['name']}" if not parts else f"overlay {ov['name']}")
    return FastPlacement(ov["name"], "; ".join(parts), policy, ca_profile=ov["ca_profile"])
