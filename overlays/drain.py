"""Drain planning: which nodes of an overlay would move where if it were retired.

``plan_drain`` is a pure function over the registry and the current assignments (from the
ledger, or an exported file). It keeps affinity groups whole whenever an overlay has room for
the whole group, preferring an overlay where the group already lives, then overlays in the
same region as the drained one, then the least filled. Groups are packed largest first so
big customers find room before the long tail fragments it. Nothing is moved: the plan is a
report for the operator (and a test oracle for what placement will do as nodes re-provision).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from overlays.ledger import Assignment
from overlays.model import Overlay
from overlays.registry import OverlayRegistry


@dataclass(frozen=True, slots=True)
class Move:
    """One node leaving the drained overlay; ``target`` None means no room anywhere."""

    identity: str
    source: str
    target: str | None
    group: str | None
    reason: str


@dataclass(slots=True)
class DrainPlan:
    """The moves for draining ``overlay`` and the fill they would leave behind."""

    overlay: str
    moves: list[Move] = field(default_factory=list)
    fill_after: dict[str, int] = field(default_factory=dict)
    groups_split: int = 0

    @property
    def by_target(self) -> dict[str, int]:
        """Moves per target overlay; unplaceable nodes count under ``"(no room)"``."""
        out: Counter[str] = Counter(m.target or "(no room)" for m in self.moves)
        return dict(sorted(out.items()))

    @property
    def unplaceable(self) -> int:
        """Nodes that would find no room in any active overlay."""
        return sum(1 for m in self.moves if m.target is None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "overlay": self.overlay,
            "nodes": len(self.moves),
            "by_target": self.by_target,
            "unplaceable": self.unplaceable,
            "groups_split": self.groups_split,
            "fill_after": self.fill_after,
            "moves": [
                {
                    "identity": m.identity,
                    "from": m.source,
                    "to": m.target,
                    "group": m.group,
                    "reason": m.reason,
                }
                for m in self.moves
            ],
        }


def normalize_assignments(raw: Any) -> dict[str, Assignment]:
    """Accept ``{identity: overlay}``, ``{identity: {overlay, group}}`` or a list of records."""
    out: dict[str, Assignment] = {}
    items: list[tuple[str, Any]]
    if isinstance(raw, Mapping):
        inner = raw.get("assignments", raw) if "assignments" in raw else raw
        if isinstance(inner, list):
            return normalize_assignments(inner)
        items = list(inner.items())
    elif isinstance(raw, list):
        items = []
        for i, rec in enumerate(raw):
            if not isinstance(rec, Mapping) or not isinstance(rec.get("identity"), str):
                raise ValueError(f"assignments[{i}]: want a mapping with 'identity' and 'overlay'")
            items.append((rec["identity"], rec))
    else:
        raise ValueError("assignments: want a mapping identity -> overlay or a list of records")
    for identity, value in items:
        if isinstance(value, str):
            out[str(identity)] = Assignment(str(identity), value, "committed")
        elif isinstance(value, Mapping) and isinstance(value.get("overlay"), str):
            group = value.get("group")
            out[str(identity)] = Assignment(
                str(identity),
                value["overlay"],
                "committed",
                None,
                str(group) if group is not None else None,
            )
        else:
            raise ValueError(f"assignments: entry {identity!r} has no overlay name")
    return out


def plan_drain(
    registry: OverlayRegistry, overlay: str, assignments: Mapping[str, Assignment]
) -> DrainPlan:
    """Plan moving every node out of ``overlay`` into active overlays with room."""
    source = registry.get(overlay)
    counts: Counter[str] = Counter(a.overlay for a in assignments.values())
    targets = [o for o in registry if o.accepts_new and o.name != source.name]
    free = {o.name: max(0, o.capacity - counts.get(o.name, 0)) for o in targets}
    by_name = {o.name: o for o in targets}

    where: dict[str, Counter[str]] = {}
    groups: dict[str, list[str]] = {}
    for a in sorted(assignments.values(), key=lambda a: a.identity):
        if a.overlay == source.name:
            groups.setdefault(a.group if a.group is not None else "\x00" + a.identity, []).append(
                a.identity
            )
        elif a.group is not None:
            where.setdefault(a.group, Counter())[a.overlay] += 1

    plan = DrainPlan(overlay=source.name)

    def new_target_key(o: Overlay) -> tuple[int, float, str]:
        # Same region as the drained overlay first, then the emptiest.
        used = o.capacity - free[o.name]
        return (0 if o.region == source.region else 1, used / o.capacity, o.name)

    for gkey, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        group = None if gkey.startswith("\x00") else gkey
        n = len(members)
        homes = [
            name
            for name, _ in (where.get(group, Counter()).most_common() if group else [])
            if name in by_name
        ]
        others = sorted((o for o in targets if o.name not in homes), key=new_target_key)
        order = homes + [o.name for o in others]
        whole = next((name for name in order if free[name] >= n), None)
        if whole is not None:
            reason = (
                f"joins its group in {whole}"
                if whole in homes
                else (f"whole group to {whole}" if group else f"to {whole}")
            )
            for ident in members:
                plan.moves.append(Move(ident, source.name, whole, group, reason))
            free[whole] -= n
            continue
        # No single overlay fits the group: fill where it lives, then the roomiest.
        rest = list(members)
        used_targets = 0
        for name in homes + sorted((o.name for o in others), key=lambda name: (-free[name], name)):
            take = min(free[name], len(rest))
            if take <= 0:
                continue
            used_targets += 1
            for ident in rest[:take]:
                plan.moves.append(
                    Move(ident, source.name, name, group, f"group split: no overlay fits all {n}")
                )
            free[name] -= take
            rest = rest[take:]
            if not rest:
                break
        for ident in rest:
            plan.moves.append(
                Move(ident, source.name, None, group, "no room in any active overlay")
            )
        if group is not None and used_targets + (1 if rest else 0) > 1:
            plan.groups_split += 1

    plan.fill_after = {o.name: o.capacity - free[o.name] for o in targets}
    return plan
