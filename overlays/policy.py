"""Placement policy building blocks: fact lookup, pin matching and the rankers.

These are pure functions; :mod:`overlays.placer` chains them. Ordering is expressed as
*tiers*: a list of lists of overlays, where every overlay of an earlier tier is tried before
any overlay of a later one. Each policy in the chain refines the order *within* the tiers it
receives, so a policy listed earlier always takes precedence over one listed later.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias

# Types only: the reference helper's exec fast path imports the pure functions below and must
# not load pydantic (overlays.model).
if TYPE_CHECKING:
    from overlays.model import Overlay, PinRule

Tiers: TypeAlias = "list[list[Overlay]]"


def fact_value(facts: Mapping[str, Any], name: str) -> str | None:
    """The fact ``name`` as text (dotted names walk nested mappings); None when absent/empty."""
    value: Any = facts.get(name) if name in facts else None
    if value is None and "." in name:
        value = facts
        for part in name.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
    if value is None or isinstance(value, Mapping | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text or None


def pin_matches(rule: PinRule, facts: Mapping[str, Any]) -> bool:
    """True if every fact in the rule's ``match`` equals one of its glob patterns."""
    return match_facts(rule.match, facts)


def match_facts(match: Mapping[str, str | Sequence[str]], facts: Mapping[str, Any]) -> bool:
    """True if every fact named in ``match`` equals one of its glob patterns."""
    for name, patterns in match.items():
        value = fact_value(facts, name)
        if value is None:
            return False
        options = [patterns] if isinstance(patterns, str) else patterns
        if not any(fnmatch.fnmatchcase(value, p) for p in options):
            return False
    return True


def first_pin(pins: Sequence[PinRule], facts: Mapping[str, Any]) -> tuple[int, PinRule] | None:
    """The first matching pin rule and its index."""
    for index, rule in enumerate(pins):
        if pin_matches(rule, facts):
            return index, rule
    return None


def hrw_unit(key: str, overlay: str) -> float:
    """A uniform number in (0, 1) fixed by (key, overlay): rendezvous hashing."""
    if len(key) > 256:  # keys are identities and fact values: a longer one is not remembered
        return _hrw_unit(key, overlay)
    return _cached_hrw_unit(key, overlay)


def _hrw_unit(key: str, overlay: str) -> float:
    digest = hashlib.blake2b(f"{key}\x00{overlay}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


#: The nodes of an affinity group share its key: each ranking of a group's overlays hashes the
#: same (group, overlay) pairs again. A pure function, so remembering recent ones is safe.
_cached_hrw_unit = lru_cache(maxsize=8192)(_hrw_unit)


def weighted_score(key: str, overlay: Overlay) -> float:
    """Weighted rendezvous score: an overlay wins a key with probability ∝ its weight."""
    return weighted_unit(key, overlay.name, overlay.weight)


def weighted_unit(key: str, name: str, weight: float) -> float:
    """:func:`weighted_score` of an overlay given by name and weight."""
    if weight <= 0:
        return -math.inf
    return -weight / math.log(hrw_unit(key, name))


def rank(
    ranker: str, overlays: Sequence[Overlay], key: str, counts: Mapping[str, int]
) -> list[Overlay]:
    """Order one tier with the chain's ranker; ``key`` (group or identity) breaks ties stably."""
    if ranker == "least_filled":

        def fill_key(o: Overlay) -> tuple[float, float]:
            # Weight scales how full an overlay may look before it loses preference.
            fill = counts.get(o.name, 0) / o.capacity if o.capacity else math.inf
            return (fill / o.weight if o.weight else math.inf, -hrw_unit(key, o.name))

        return sorted(overlays, key=fill_key)
    if ranker == "weighted":
        return sorted(overlays, key=lambda o: -weighted_score(key, o))
    if ranker == "hash":
        return sorted(overlays, key=lambda o: -hrw_unit(key, o.name))
    raise ValueError(f"unknown ranker {ranker!r}")


def split_tiers(tiers: Tiers, first: Sequence[Overlay], *, each: bool = False) -> Tiers:
    """Within each tier, move the overlays in ``first`` ahead of the rest.

    With ``each`` every overlay of ``first`` becomes its own tier, so their order is kept
    (an affinity group's home before its spill-over); otherwise they form one tier.
    """
    names = [o.name for o in first]
    out: Tiers = []
    for tier in tiers:
        in_tier = {o.name: o for o in tier}
        head = [in_tier[n] for n in names if n in in_tier]
        tail = [o for o in tier if o.name not in names]
        heads = [[o] for o in head] if each else ([head] if head else [])
        out.extend(heads)
        if tail:
            out.append(tail)
    return out
